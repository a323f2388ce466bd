// Glass-to-glass instrumentation of the live page (scripts/bench_g2g.py, runtime/g2g.py), on only when
// the page is opened with #g2g: a fragment, because it never reaches the server (the page passes its
// query on to /ws, which refuses parameters it does not know). Off, window.mirageStats is null and
// app.js's hooks cost one null check each.
// Per frame id (the sequence number sent with the frame and echoed back), in performance.now() ms:
// capture (the camera frame's captureTime, else its presentation time; the synthetic source: sample),
// sample (drawn onto the input canvas), send, receive, drawn (on the output canvas), display (the next
// animation frame after drawn: the frame that carries those pixels), and the counter code read from
// the picture sent (counter_in) and from the pixels shown (counter_out). The code is runtime/g2g.py's.
"use strict";

window.mirageStats = !location.hash.includes("g2g") ? null : (() => {
  const GRID = 4, COUNTER_BITS = 12, CHECK_SALT = 0b1010, MIN_CONTRAST = 24; // as runtime/g2g.py
  const records = new Map();
  let started = null, camera = null; // camera: the newest video frame's {capture, source}

  function codeWord(n) {
    const check = (n ^ (n >> 4) ^ (n >> 8) ^ CHECK_SALT) & 0xf;
    return n | (check << COUNTER_BITS);
  }

  function readCode(ctx, size) { // runtime/g2g.py: read_code, on a canvas of size x size
    const px = ctx.getImageData(0, 0, size, size).data, cell = size / GRID, means = [];
    for (let i = 0; i < GRID * GRID; i++) {
      const top = Math.floor(i / GRID) * cell, left = (i % GRID) * cell;
      const y0 = Math.floor(top + cell / 4), y1 = Math.max(y0 + 1, Math.floor(top + 3 * cell / 4));
      const x0 = Math.floor(left + cell / 4), x1 = Math.max(x0 + 1, Math.floor(left + 3 * cell / 4));
      let sum = 0;
      for (let y = y0; y < y1; y++) {
        for (let x = x0; x < x1; x++) {
          const k = 4 * (y * size + x);
          sum += 0.299 * px[k] + 0.587 * px[k + 1] + 0.114 * px[k + 2];
        }
      }
      means.push(sum / ((y1 - y0) * (x1 - x0)));
    }
    const low = Math.min(...means), high = Math.max(...means);
    if (high - low < MIN_CONTRAST) return null;
    const word = means.reduce((w, m, i) => (m > (low + high) / 2 ? w | (1 << i) : w), 0);
    const counter = word & ((1 << COUNTER_BITS) - 1);
    return codeWord(counter) === word ? counter : null;
  }

  const video = document.getElementById("video");
  function watch(now, meta) { // every camera frame handed to the compositor
    camera = meta.captureTime !== undefined ? { capture: meta.captureTime, source: "captureTime" }
                                            : { capture: meta.presentationTime, source: "presentationTime" };
    video.requestVideoFrameCallback(watch);
  }
  if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(watch);

  return {
    start() { if (started === null) started = performance.now(); },
    sampled(id, ctx, size, fromVideo) {
      const now = performance.now();
      const cam = fromVideo && camera ? camera : { capture: now, source: "sample" };
      records.set(id, { id, counter_in: ctx ? readCode(ctx, size) : null, capture: cam.capture,
                        capture_source: cam.source, sample: now, send: null, receive: null, drawn: null,
                        display: null, counter_out: null });
    },
    sent(id) { const r = records.get(id); if (r) r.send = performance.now(); },
    received(id) { const r = records.get(id); if (r) r.receive = performance.now(); },
    drawn(id, ctx, size) {
      const r = records.get(id);
      if (!r) return;
      r.drawn = performance.now();
      r.counter_out = readCode(ctx, size);
      requestAnimationFrame(() => { r.display = performance.now(); });
    },
    report() { return { now: performance.now(), started, records: [...records.values()] }; },
  };
})();
