"""`mirage-serve`: live streams through one model over HTTP + WebSocket, with a browser page.

    mirage-serve                                   # bundled tiny-v2v, CPU, http://127.0.0.1:8000/
    mirage-serve artifacts/base --slots 16 --device cuda
    mirage-serve CKPT --slots 16 --device cuda:0,cuda:1   # one pool per GPU, streams to the least-loaded one
    MIRAGE_SERVE_TOKEN=SECRET mirage-serve CKPT --host 0.0.0.0   # reachable from other machines: a token is
                                                                 # required (--token SECRET shows in `ps`)
    mirage-serve CKPT --ray --device cuda --slots 16 --max-replicas 8   # through Ray Serve: one replica per GPU
    mirage-serve CKPT --ray-address HEAD:6379 --device cuda --slots 16  # on an existing Ray cluster
    mirage-serve checkpoints/dit-tiny-taesd --dit dit-tiny-taesd --prompt trained \
        --prompt-bank checkpoints/dit-tiny-taesd/prompts.safetensors   # the DiT trained here; prompts by name
    mirage-serve self_forcing_dmd.pt --dit wan-1.3b --decoder taew2_1.pth --strength 0.6 \
        --prompt-embeds cat.safetensors --device cuda --slots 1   # Wan 1.3B video-to-video at 832x480 (TAEHV codec)
"""
from __future__ import annotations

import logging
import signal
import socket
import time
from pathlib import Path

import click

from mirage.bridge.source import ModelSource
from mirage.cli.errors import UserError
from mirage.cli import options as shared
from mirage.cli.run import PACKAGE_ROOT
from mirage.core.errors import MirageError

DEFAULT_MODEL = PACKAGE_ROOT / "checkpoints" / "tiny-v2v"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path),  # a file: a DiT's .pt
                default=DEFAULT_MODEL)
@click.option("--host", default="127.0.0.1",
              help="Address to bind. Anything but loopback (127.0.0.1, ::1, localhost) requires --token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="TCP port.")
@click.option("--slots", type=click.IntRange(1, 1024), default=None, show_default=False,
              help="Concurrent streams: the pool's batch. One more client is answered 'busy'. Default: an "
                   "artifact's own batch where it is static (a DiT's always is; mirage-export --batch), else 4 "
                   "(up to a dynamic artifact's --max-batch).")
@click.option("--token", default=None, envvar="MIRAGE_SERVE_TOKEN",
              help="Access token, checked on the page and the WebSocket: 'Authorization: Bearer TOKEN' or "
                   "?token=TOKEN. Also read from $MIRAGE_SERVE_TOKEN (out of the process list). Never printed or "
                   "logged.")
@click.option("--device", "devices", default="auto",
              help="auto, cpu, cuda or cuda:N; several, comma-separated (cuda:0,cuda:1), give one pool of "
                   "--slots streams per device, a new stream going to the least-loaded one.")
@shared.backend
@shared.fast
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=100.0,
              help="A frame that has waited longer than this when its step starts is dropped and counted "
                   "(never two of a stream in a row).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=5.0,
              help="After the first pending frame, how long a step waits for the frames of the other streams "
                   "that are sending (0: step at once).")
@click.option("--max-frame-bytes", type=click.IntRange(min=1024), default=1 << 20,
              help="A larger image is answered with an error; a message over twice this plus 16 bytes closes "
                   "that connection.")
@click.option("--calibrate-steps", type=click.IntRange(min=0), default=10, show_default=True,
              help="At start, time this many steps of the idle pool: the step time the server plans batches with "
                   "(with two steps in flight on a GPU), and /health's idle_step_ms. 0: a CPU pool learns it from "
                   "served steps; a GPU pool is still timed, over 3 steps.")
@click.option("--max-prompt-chars", type=click.IntRange(min=1), default=2000,
              help="A block model's control message with a longer prompt is refused before the text encoder sees "
                   "it (the model refuses one over its encoder's token limit).")
@click.option("--control-interval-ms", type=click.FloatRange(min=0), default=500.0,
              help="A stream's control messages (prompt, strength) are applied at most this often, those in "
                   "between merged: each new prompt is encoded and the stream's cache rebuilt between steps.")
@shared.group("dit", shared.dit, shared.lora, shared.prompt, shared.prompt_embeds, shared.text_encoder,
              shared.strength, shared.max_strength, shared.cache_from,
              click.option("--prompt-bank", type=click.Path(path_type=Path), default=None,
                           help="A DiT's named prompt embeddings, a .safetensors file of (L, text_dim) tensors: a "
                                "control message's prompt names one (else, with --text-encoder, it is encoded; "
                                "without, refused), --prompt may too, and the page offers the names."),
              click.option("--decoder", type=click.Path(path_type=Path), default=None,
                           help="--dit: a TAEHV file (taew2_1.pth), the DiT's codec: streams get video frames (a "
                                "stream's first 3 are TAEHV's warm-up frames), and with --strength video-to-video "
                                "(its encoder.* weights needed). mirage-run --dit's --decoder; the Wan VAE is not a "
                                "runtime codec."))
@click.option("--cpu-jpeg", is_flag=True,
              help="Decode JPEGs with Pillow in CPU threads even on a GPU that has nvJPEG (by default they are "
                   "decoded in batches on the pool's GPU, PyTorch backend; replies are Pillow's either way).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve (a local Ray unless --ray-address): one replica = one pool of --slots "
                   "streams on one GPU (--device cuda) or the CPU; docs/SERVING.md.")
@click.option("--ray-address", default=None, help="With --ray: the Ray cluster's head, HOST:PORT (or auto).")
@click.option("--min-replicas", type=click.IntRange(min=1), default=1, help="With --ray: replicas at least.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: replicas at most (default: --min-replicas); above the minimum Ray adds replicas "
                   "as streams come.")
@click.option("--target-streams", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --ray and autoscaling: open streams per replica to aim for (default: 3/4 of --slots).")
@click.option("--drain-s", type=click.FloatRange(min=0), default=3600.0,
              help="With --ray: how long a replica being replaced or removed keeps serving its open streams.")
def main(model, host, port, slots, token, devices, backend, fast, deadline_ms, batch_wait_ms, max_frame_bytes,
         calibrate_steps, max_prompt_chars, control_interval_ms, dit, cpu_jpeg, use_ray, ray_address, min_replicas,
         max_replicas, target_streams, drain_s):
    """Serve MODEL (a checkpoint folder or an exported artifact, or with --dit a DiT checkpoint file or folder;
    default: the bundled tiny-v2v) to
    browsers and WebSocket clients: open http://HOST:PORT/ for the page (webcam, video file or a
    synthetic source). All streams advance together, one batched step per frame (a DiT: per block), in a
    pool of --slots streams. A DiT checkpoint needs --dit CONFIG; a DiT (checkpoint or artifact) needs its
    streams' starting prompt, and takes prompts in control messages with --prompt-bank or --text-encoder.
    Protocol, limits and benchmark: docs/SERVING.md."""
    try:
        from aiohttp import web
    except ImportError as e:
        raise UserError("mirage-serve needs aiohttp: pip install 'mirage-video[serve]'") from e
    from mirage.runtime.pool import PoolGroup, StreamPool, default_slots
    from mirage.runtime.server import AccessLog, RedactingFormatter, ServerOptions, make_app

    devices = [d.strip() for d in devices.split(",") if d.strip()]
    if len(set(devices)) != len(devices) or not devices:
        raise UserError(f"--device {','.join(devices)}: name each device once")
    bad = [d for d in devices if not shared.DEVICE.fullmatch(d)]
    if bad:
        raise UserError(f"--device {','.join(bad)}: give auto, cpu, cuda or cuda:N")
    for name in devices:
        shared.check_fast(fast, name)
    try:
        slots = slots or default_slots(model)
    except MirageError as e:
        raise UserError(str(e)) from e
    source = ModelSource(model, *(dit[k] for k in ("config", "lora", "prompt", "prompt_embeds", "text_encoder",
                                                   "prompt_bank", "strength", "decoder", "max_strength", "cache_from")))
    try:  # the options and the prompt files first: a refused binding should not wait for a model to load
        options = ServerOptions(host=host, port=port, token=token, deadline_ms=deadline_ms,
                                batch_wait_ms=batch_wait_ms, max_frame_bytes=max_frame_bytes,
                                calibrate_steps=calibrate_steps, max_prompt_chars=max_prompt_chars,
                                control_interval_ms=control_interval_ms, gpu_jpeg=not cpu_jpeg,
                                prompt_names=tuple(source.prompt_names), prompt=source.prompt)
        if use_ray or ray_address:
            return serve_on_ray(source, slots, backend, devices, fast, options, ray_address, min_replicas=min_replicas,
                                max_replicas=max_replicas or min_replicas, target_streams=target_streams,
                                drain_s=drain_s)
        _check_listen(host, port)  # before the model loads: a taken port is said in a second, not after it
        # the server hands the pool uint8 frames and takes uint8 back: they cross to the device as they are
        pipeline = source.serving_options(fast)
        opened = dict(backend=backend, options=pipeline, load=source.load)  # checkpoints run on the torch side
        pool = StreamPool.open(model, slots, device=devices[0], **opened) if len(devices) == 1 \
            else PoolGroup.open(model, slots, devices, **opened)
    except MirageError as e:
        raise UserError(str(e)) from e
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(message)s", token))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    # the token itself is never printed: a terminal is shared, scrolled back and recorded
    given = "$MIRAGE_SERVE_TOKEN" if click.get_current_context().get_parameter_source("token").name == "ENVIRONMENT" \
        else "--token"
    # the devices as the pools resolved them (auto -> cpu, or cuda:0 and its GPU's name)
    click.echo(f"mirage-serve: {model} in {pool.slots} slots on {', '.join(pool.devices)}; open http://{shown}:{port}/"
               + (f"?token=TOKEN, TOKEN being the value of {given}" if token else ""))
    try:
        web.run_app(make_app(pool, options), host=host, port=port, print=None, access_log_class=AccessLog)
    except OSError as e:  # taken between the check and the bind
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    finally:
        pool.close()


def _check_listen(host: str, port: int) -> None:
    """Refuse a host:port this process cannot listen on (taken, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos[:1]:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
                probe.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or stop "
                        "what holds it") from e


def serve_on_ray(source, slots, backend, devices, fast, options, address, **replicas) -> None:
    """mirage-serve --ray: deploy on Ray Serve, print where, wait for Ctrl-C (MirageError: a user error)."""
    if devices[0] not in ("auto", "cpu", "cuda") or len(devices) > 1:
        raise UserError(f"--device {','.join(devices)}: with --ray give cpu or cuda (Ray gives each replica its GPU)")
    if not 1 <= replicas["min_replicas"] <= replicas["max_replicas"]:
        raise UserError(f"--max-replicas {replicas['max_replicas']} is below --min-replicas {replicas['min_replicas']}")
    try:
        from mirage.bridge import ray_app
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("ray", "fastapi", "starlette"):
            raise
        raise UserError(f"mirage-serve --ray needs Ray Serve: pip install 'mirage-video[ray]' ({e})") from e
    import ray
    from ray import serve

    started = ray_app.connect(address)
    device = devices[0] if devices[0] != "auto" else "cuda" if ray.cluster_resources().get("GPU") else "cpu"
    previous = signal.signal(signal.SIGTERM, stop)  # a service manager's stop: as Ctrl-C
    try:
        ray_app.deploy(ray_app.application(source, slots, backend, device, fast, options, **replicas), options.host,
                       options.port)
        shown = "localhost" if options.host in ("127.0.0.1", "::1") else options.host
        click.echo(f"mirage-serve --ray: {source.path} in {replicas['min_replicas']}-{replicas['max_replicas']} "
                   f"replicas of {slots} slots on {device}; open http://{shown}:{options.port}/"
                   + ("?token=(your --token)" if options.token else ""))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # a local Ray goes with its streams; on a cluster the replicas drain (--drain-s)
        if not started:
            click.echo("deleting the application: its replicas serve their open streams until they end")
            serve.delete(ray_app.APP_NAME)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


def stop(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
