// Mirage live page: a source (webcam, video file or synthetic) drawn at the model's size -> JPEG
// frames over /ws -> the model's frames back onto a canvas. Protocol: docs/SERVING.md.
// Each frame is a 16-byte little-endian header (uint32 id, uint8 format, 3 zero bytes, float64
// timestamp) and a JPEG; the server echoes id and timestamp, so latency = now - timestamp.
"use strict";

const HEADER_BYTES = 16, JPEG = 1, SEND_FPS = 30;
const MAX_BUFFERED = 256 * 1024; // bytes queued in the socket: above this a frame is skipped, not queued
// A model answering frame by frame: frames sampled and not yet answered (in the JPEG encoder, the socket or the
// server), above which the next frame is skipped rather than queued (4 at 30 FPS: 133 ms, over the 100 ms a
// served stream is meant to take). A page slower than the camera (8 streams of 512x512 in software-rendered
// Chromiums) otherwise built a backlog of seconds. Encodes still overlap up to that bound, on the timer: one
// at a time, sent as camera frames were presented (requestVideoFrameCallback), 16 pages of 64x64 on the GPU
// machine's 16 cores sent 11 frames a second where they had sent 28. After STALL_MS with no reply it sends
// anyway, so that a lost reply cannot stop the stream.
const MAX_AHEAD = 4, STALL_MS = 1000;
const $ = (id) => document.getElementById(id);
const inputCanvas = $("input"), outputCanvas = $("output");
const inputCtx = inputCanvas.getContext("2d"), outputCtx = outputCanvas.getContext("2d");

let ws = null, model = null, draw = null, timer = null, nextId = 0;
let lastSent = -1, lastReply = { id: -1, at: 0 }; // ids: the newest frame sent, the newest answered (and when)
let lastDrawn = [-1, 0]; // [id, index] of the frame on the canvas: a block model answers a request with several
const arrivals = []; // [time, latency ms] of the frames received in the last second
let received = 0;

function status(text) { $("status").textContent = text; }

function header(id, timestamp) {
  const buf = new ArrayBuffer(HEADER_BYTES), view = new DataView(buf);
  view.setUint32(0, id, true);
  view.setUint8(4, JPEG);
  view.setFloat64(8, timestamp, true);
  return buf;
}

// -- sources: each is a draw(ctx, w, h) that paints the current frame -------------------------------
async function openSource(kind) {
  if (kind === "synthetic") return synthetic;
  const video = $("video");
  if (kind === "webcam") {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
  }
  await video.play();
  return (ctx, w, h) => { // center crop to a square, scaled to the model's size
    const side = Math.min(video.videoWidth, video.videoHeight);
    ctx.drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2, side, side, 0, 0, w, h);
  };
}

function synthetic(ctx, w, h) { // three discs circling over a drifting two-color gradient
  const t = performance.now() / 1000;
  const g = ctx.createLinearGradient(0, 0, w, h);
  g.addColorStop(0, `hsl(${(t * 40) % 360}, 70%, 45%)`);
  g.addColorStop(1, `hsl(${(t * 40 + 180) % 360}, 70%, 30%)`);
  ctx.fillStyle = g;
  ctx.fillRect(0, 0, w, h);
  for (let k = 0; k < 3; k++) {
    ctx.fillStyle = `hsl(${(k * 120 + t * 60) % 360}, 80%, 60%)`;
    ctx.beginPath();
    ctx.arc(w * (0.5 + 0.33 * Math.sin(t * (0.7 + 0.3 * k) + 2 * k)), h * (0.5 + 0.33 * Math.cos(t * (0.9 + 0.2 * k))),
            w * 0.13, 0, 2 * Math.PI);
    ctx.fill();
  }
}

function stopSource() {
  const video = $("video");
  if (video.srcObject) video.srcObject.getTracks().forEach((track) => track.stop());
  video.srcObject = null;
  video.pause();
}

// -- the socket ----------------------------------------------------------------------------------------
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // passes ?token= and ?seed= on: a browser's WebSocket cannot send an Authorization header, and the
  // server logs no query string
  ws = new WebSocket(`${scheme}://${location.host}/ws${location.search}`);
  lastReply = { id: nextId - 1, at: performance.now() }; // nothing in flight on a new connection
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => (typeof e.data === "string" ? onControl(JSON.parse(e.data)) : onFrame(e.data));
  ws.onclose = (e) => {
    stop();
    // 1000: we closed it; 1013: "busy", already shown
    if (e.code !== 1000 && e.code !== 1013) status(`connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
  };
}

function onControl(msg) {
  if (msg.type === "hello") {
    model = msg;
    for (const c of [inputCanvas, outputCanvas]) [c.width, c.height] = [msg.width, msg.height];
    status(`stream in slot ${msg.slot} of ${msg.slots}: ${msg.width}x${msg.height}, ` +
           (msg.video_to_video ? "video-to-video" : "generation (no input is sent)"));
    showConditioning(msg);
    // a model answering frame by frame (frames_in 1: the U-Net's video-to-video) is fed at the camera's rate;
    // any other plays at its video rate, and sending faster only replaces inputs the server holds
    timer = setInterval(sendFrame, 1000 / (msg.frames_in === 1 ? SEND_FPS : msg.video_rate || SEND_FPS));
  } else if (msg.type === "late" && msg.id > lastReply.id) { // dropped by the server's deadline: answered too
    lastReply = { id: msg.id, at: performance.now() };
  } else if (msg.type === "busy") {
    status(`server busy: ${msg.message}`);
  } else if (msg.type === "error") {
    status(`server: ${msg.message}`);
  } else if (msg.type === "applied") {
    showApplied(msg);
  } else if (msg.type === "stats") {
    $("streams").textContent = `${msg.streams} of ${msg.slots}`;
    $("server-fps").textContent = msg.fps;
    $("dropped").textContent = `${msg.stale} / ${msg.late}`;
  }
}

function sendFrame() {
  if (ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > MAX_BUFFERED) return;
  const now = performance.now();
  if (model.frames_in === 1 && nextId - 1 - lastReply.id >= MAX_AHEAD && now - lastReply.at < STALL_MS) return;
  const id = nextId++, timestamp = now, stats = window.mirageStats; // g2g.js: null unless #g2g
  if (!model.video_to_video) {
    stats?.sampled(id, null, 0, false);
    ws.send(header(id, timestamp));
    stats?.sent(id);
    return;
  }
  draw(inputCtx, model.width, model.height);
  stats?.sampled(id, inputCtx, model.width, draw !== synthetic);
  inputCanvas.toBlob((jpeg) => {
    // encodes overlap and may finish out of order: a frame older than one already sent is dropped, not sent late
    if (!jpeg || ws.readyState !== WebSocket.OPEN || id < lastSent) return;
    lastSent = id;
    ws.send(new Blob([header(id, timestamp), jpeg]));
    stats?.sent(id);
  }, "image/jpeg", 0.9);
}

async function onFrame(data) {
  const view = new DataView(data);
  const id = view.getUint32(0, true), index = view.getUint8(5), latency = performance.now() - view.getFloat64(8, true);
  window.mirageStats?.received(id);
  if (id > lastReply.id) lastReply = { id, at: performance.now() };
  const bitmap = await createImageBitmap(new Blob([data.slice(HEADER_BYTES)], { type: "image/jpeg" }));
  // decoding is asynchronous: never draw an older frame over a newer one
  if (id > lastDrawn[0] || (id === lastDrawn[0] && index > lastDrawn[1])) {
    outputCtx.drawImage(bitmap, 0, 0);
    window.mirageStats?.drawn(id, outputCtx, model.width);
    lastDrawn = [id, index];
  }
  bitmap.close();
  arrivals.push([performance.now(), latency]);
  $("frames-received").textContent = ++received;
}

function showRates() { // FPS and median latency over the last second
  const now = performance.now();
  while (arrivals.length && now - arrivals[0][0] > 1000) arrivals.shift();
  $("fps").textContent = arrivals.length;
  const sorted = arrivals.map((a) => a[1]).sort((a, b) => a - b);
  $("latency").textContent = sorted.length ? `${sorted[sorted.length >> 1].toFixed(1)} ms` : "–";
}

// -- conditioning: a prompt and a strength, for a model that takes them -----------------------------------
// A change is sent as one control message once the box or slider has been still for CONTROL_DEBOUNCE_MS
// (the server applies at most one per stream every half second anyway, merging what comes between), with
// only the fields changed: a new prompt costs the server a text encoding and a cache rebuild, a strength not.
const CONTROL_DEBOUNCE_MS = 400;
let controlTimer = null;
const changed = new Set(); // "prompt", "strength": changed since the last control sent

function showConditioning(msg) {
  const controls = msg.controls || {};
  $("prompt-label").hidden = !controls.prompt;
  $("strength-label").hidden = !controls.strength;
  $("conditioning").hidden = !(controls.prompt || controls.strength);
  if (controls.prompt) $("prompt").maxLength = msg.max_prompt_chars;
  // a server with a prompt bank names its prompts: offered as the box's suggestions (a server without a text
  // encoder takes only these)
  $("prompt-names").replaceChildren(...(msg.prompts || []).map((name) => new Option(name, name)));
  if (msg.prompts?.length) $("prompt").placeholder = `e.g. ${msg.prompts.slice(0, 3).join(", ")}`;
  if (controls.strength) [$("strength").min, $("strength").max] = controls.strength;
  // the slider and the box show the stream's own strength and prompt (mirage-serve --strength, --prompt), not
  // the page's defaults sent over them; another prompt typed before start (the box keeps it after a stop) is sent
  if (msg.strength !== undefined) showStrength(msg.strength);
  const typed = $("prompt").value;
  if (controls.prompt && typed && typed !== msg.prompt) changed.add("prompt");
  else if (msg.prompt !== undefined) $("prompt").value = msg.prompt;
  sendControl();
}

function sendControl() {
  clearTimeout(controlTimer);
  if (!ws || ws.readyState !== WebSocket.OPEN || !model || !model.controls) return;
  const msg = { type: "control" };
  if (changed.has("prompt") && model.controls.prompt) msg.prompt = $("prompt").value;
  if (changed.has("strength") && model.controls.strength) msg.strength = Number($("strength").value);
  changed.clear();
  if (Object.keys(msg).length > 1) ws.send(JSON.stringify(msg));
}

function showApplied(msg) {
  const parts = [];
  if (msg.prompt !== undefined) parts.push(`prompt "${msg.prompt}"`);
  if (msg.strength !== undefined) parts.push(`strength ${msg.strength.toFixed(2)}`);
  status(`applied: ${parts.join(", ")}`);
}

function showStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

function controlChanged(field) {
  showStrength($("strength").value);
  changed.add(field);
  clearTimeout(controlTimer);
  controlTimer = setTimeout(sendControl, CONTROL_DEBOUNCE_MS);
}

$("prompt").oninput = () => controlChanged("prompt");
$("strength").oninput = () => controlChanged("strength");

// -- controls --------------------------------------------------------------------------------------------
async function start() {
  window.mirageStats?.start();
  try {
    draw = await openSource($("source").value);
  } catch (e) {
    status(`cannot open the source: ${e.message}`);
    return;
  }
  $("start").disabled = true;
  $("stop").disabled = false;
  status("connecting…");
  connect();
}

function stop() {
  clearInterval(timer);
  timer = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  stopSource();
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("source").onchange = () => { $("file").hidden = $("source").value !== "file"; };
$("start").onclick = start;
$("stop").onclick = () => { stop(); status("stopped"); };
setInterval(showRates, 500);
