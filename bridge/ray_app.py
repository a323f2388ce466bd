"""`mirage-serve --ray`: the streams of mirage-serve across a Ray cluster, through Ray Serve.

    mirage-serve CKPT --ray --device cuda --slots 16 --min-replicas 1 --max-replicas 8
    serve run mirage.bridge.ray_app:build model=/shared/artifacts/base slots=16 device=cuda max_replicas=8

One deployment, `StreamReplica`: each replica owns one StreamPool on one GPU (or the CPU) and runs
mirage-serve's own server on it (runtime/server.py: the stepper, codec threads, the per-stream
protocol, limits and token), behind a FastAPI ingress instead of aiohttp, so the page, `/ws` and its
messages are mirage-serve's. Ray Serve's HTTP proxy routes each WebSocket, one long request, to one
replica for its whole life, so a stream stays on the GPU holding its memory.

Placement: a replica takes `slots + 1` ongoing requests (max_ongoing_requests): its slots, plus one
spare through which a stream that finds every replica full is answered `busy` in the protocol (with
exactly `slots`, Ray would queue that connection until a slot frees). The request router
(`LeastLoaded`) sends a new connection to the replica with the fewest ongoing requests among all,
so a stream lands on a replica with a free slot while any has one (Ray's default, power of two
choices, compares two random replicas and could pick two full ones).

Autoscaling: Ray's, on ongoing requests (= open streams) per replica, between --min-replicas and
--max-replicas around --target-streams. Draining: a replica that is removed (a redeploy, scaling
down, `serve shutdown`) takes no new stream and keeps serving its streams until they end, for up to
--drain-s (graceful_shutdown_timeout_s); then its remaining streams are closed with 1001.

Faults: a replica whose process dies takes its streams' connections with it; Ray's proxy then ends
them without a word, so `proxy_middlewares` (installed in each proxy through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) sends those clients an `error` message and closes with 1012
(service restart): the client reconnects and lands on a live replica. `check_health` fails a
replica whose pool thread no longer answers (a hung step), and Ray replaces it.

`/health` is aggregated: every replica reports its own (mirage-serve's /health) to `Fleet`, a
one-replica deployment, twice a second; any replica answers /health with the sums and the list.
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (WebSocket, Request)
import asyncio
import json
import logging
import os
import re
import socket
import time
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import ray
from aiohttp import WSMsgType, web
from multidict import MultiDict
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, PlainTextResponse
from ray import serve
from ray.serve.request_router import FIFOMixin, RequestRouter
from starlette.middleware import Middleware
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect, WebSocketState

from mirage.bridge.source import ModelSource
from mirage.runtime.pool import StreamPool, default_slots
from mirage.runtime.server import STATIC, ServeError, Server, ServerOptions

log = logging.getLogger("mirage.serve")
APP_NAME = "mirage"
REPORT_S = 0.5   # how often a replica reports its /health to Fleet
STALE_S = 2.0    # a replica not heard from for this long is left out of /health (it died)
PROXY_ENV, PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "mirage.bridge.ray_app:proxy_middlewares"
LOST = 1012      # WebSocket close code "service restart": the client may reconnect at once


# -- placement ---------------------------------------------------------------------------------------
class LeastLoaded(FIFOMixin, RequestRouter):
    """Every replica is a candidate, in one rank: Ray's router then takes the one with the fewest ongoing
    requests (its cached or probed queue length) among those under max_ongoing_requests."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]


def deployment_options(slots: int, min_replicas: int = 1, max_replicas: int = 1, target_streams: float | None = None,
                       gpus: float = 0.0, cpus: float = 1.0, drain_s: float = 3600.0) -> dict:
    """StreamReplica's Ray Serve options: one pool of `slots` streams per replica, on `gpus` GPUs (1: one
    replica per GPU; 0: the CPU)."""
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"replicas: need 1 <= min ({min_replicas}) <= max ({max_replicas})")
    scaling = {"num_replicas": min_replicas} if min_replicas == max_replicas else {"autoscaling_config": {
        "min_replicas": min_replicas, "initial_replicas": min_replicas, "max_replicas": max_replicas,
        # streams per replica to aim for: below the slot count, so that a new replica is loading before
        # every slot is taken (a replica's start is a model load: seconds to minutes)
        "target_ongoing_requests": target_streams or max(1.0, 0.75 * slots),
        # streams last minutes: a 10 s mean of open streams (Ray's default window: 30 s) is steady enough
        "look_back_period_s": 10.0, "upscale_delay_s": 5.0, "downscale_delay_s": 120.0}}
    return {**scaling,
            "max_ongoing_requests": slots + 1,  # the spare answers `busy` (module docstring)
            "request_router_config": {"request_router_class": LeastLoaded},
            "ray_actor_options": {"num_gpus": gpus, "num_cpus": cpus},
            "graceful_shutdown_timeout_s": drain_s, "graceful_shutdown_wait_loop_s": 1.0,
            "health_check_period_s": 5.0, "health_check_timeout_s": 15.0,
            "max_constructor_retry_count": 1}  # a model that does not load will not load on a retry


# -- /health over the replicas ------------------------------------------------------------------------
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Fleet:
    """The replicas' latest /health, each with when it came."""

    def __init__(self):
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, status: dict | None) -> None:
        if status is None:  # it is shutting down
            self.reports.pop(replica, None)
        else:
            self.reports[replica] = (time.monotonic(), status)

    def summary(self, replica: str, status: dict) -> dict:
        """Totals over the live replicas, and each one's own /health; `status`: the asking replica's own,
        fresh."""
        self.report(replica, status)
        now = time.monotonic()
        live = sorted((r, s) for r, (t, s) in self.reports.items() if now - t < STALE_S)
        return {"replicas": len(live), "slots": sum(s["slots"] for _, s in live),
                "active": sum(s["active"] for _, s in live),
                **{k: status[k] for k in ("width", "height", "video_to_video")},
                "per_replica": [{"replica": r, **s} for r, s in live]}


# -- one replica ----------------------------------------------------------------------------------------
class Socket:
    """Starlette's WebSocket (inside the replica, fed by Ray's proxy) as Server.stream uses aiohttp's:
    send_json, send_bytes, close, and messages with aiohttp's type codes; a message over `max_size` closes
    the socket with 1009, as aiohttp does."""

    def __init__(self, ws: WebSocket, max_size: int):
        self.ws, self.max_size = ws, max_size

    async def send_json(self, data: dict) -> None:
        await self._send(self.ws.send_text, json.dumps(data))

    async def send_bytes(self, data: bytes) -> None:
        await self._send(self.ws.send_bytes, data)

    async def _send(self, send, data) -> None:
        if self.ws.application_state != WebSocketState.CONNECTED:
            raise ConnectionResetError("the WebSocket is closed")
        try:
            await send(data)
        except WebSocketDisconnect as e:
            raise ConnectionResetError(f"the WebSocket closed ({e.code})") from e

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            await self.ws.close(code, message.decode())

    async def __aiter__(self):
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is None:
                yield SimpleNamespace(type=WSMsgType.TEXT, data=msg.get("text"))
            elif len(msg["bytes"]) > self.max_size:
                await self.close(1009, b"message too big")
                yield SimpleNamespace(type=WSMsgType.ERROR, data=None)
                return
            else:
                yield SimpleNamespace(type=WSMsgType.BINARY, data=msg["bytes"])


ingress = FastAPI()
ingress.mount("/static", StaticFiles(directory=STATIC), name="static")


def as_aiohttp(request) -> SimpleNamespace:
    """What Server.check_token and Server.query_seed read of an aiohttp request (its headers, and its
    query as a MultiDict), from a Starlette request or WebSocket: one token and seed check for both."""
    return SimpleNamespace(headers=request.headers, query=MultiDict(request.query_params.multi_items()))


def refused(e: web.HTTPException) -> PlainTextResponse:
    """The server's aiohttp refusal (bad token, bad seed) as the same HTTP answer from FastAPI."""
    return PlainTextResponse(e.text, status_code=e.status)


@serve.deployment
@serve.ingress(ingress)
class StreamReplica:
    async def __init__(self, source: ModelSource, slots: int, backend: str, device: str, fast: bool,
                       options: ServerOptions, fleet):
        pipeline = source.serving_options(fast)  # as mirage-serve's
        self.pool = StreamPool.open(source.path, slots, backend=backend, device=device, options=pipeline,
                                    load=source.load)  # the model and its prompts, opened as mirage-serve opens them
        self.server = Server(self.pool, options)
        self.fleet = fleet
        self.name = serve.get_replica_context().replica_id.unique_id
        self.where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "device": device}
        self.lifetime = self.server.lifetime(None)  # mirage-serve's start: calibrate, then the stepper
        await anext(self.lifetime)
        self.reporter = asyncio.create_task(self.report_forever())
        log.info("replica %s: %s in %d slots on %s", self.name, source.path, slots, device)

    def status(self) -> dict:
        return {**self.server.status(), **self.where}

    async def report_forever(self) -> None:
        while True:
            try:
                await self.fleet.report.remote(self.name, self.status())
            except Exception:  # noqa: BLE001 (Fleet restarting: the next report goes through)
                log.warning("replica %s: report to Fleet failed", self.name, exc_info=True)
            await asyncio.sleep(REPORT_S)

    @ingress.get("/")
    async def index(self, request: Request):
        try:
            self.server.check_token(as_aiohttp(request))
        except web.HTTPException as e:
            return refused(e)
        return FileResponse(STATIC / "index.html")

    @ingress.get("/health")
    async def health(self):
        return await self.fleet.summary.remote(self.name, self.status())

    @ingress.websocket("/ws")
    async def websocket(self, ws: WebSocket):
        request = as_aiohttp(ws)
        try:
            self.server.check_token(request)
            seed = self.server.query_seed(request)
        except web.HTTPException as e:
            with suppress(RuntimeError):  # the proxy's server does not take the denial-response extension
                return await ws.send_denial_response(refused(e))
            return await ws.close(1008, e.text.strip())
        await ws.accept()
        await self.server.stream(Socket(ws, self.server.max_msg_size), seed, ws.client.host if ws.client else None,
                                 replica=self.name)

    async def check_health(self) -> None:
        """Ray's health check: the pool's thread must answer (a hung step fails it: Ray replaces the replica)."""
        await asyncio.wait_for(self.server.in_step_thread(time.monotonic), 10.0)

    async def __del__(self):
        """After the drain (graceful_shutdown_timeout_s): close what streams are left, stop, free the pool."""
        self.reporter.cancel()
        with suppress(Exception):
            await self.fleet.report.remote(self.name, None)
        await self.server.close_streams(None)
        with suppress(StopAsyncIteration):
            await anext(self.lifetime)
        self.pool.close()


def application(source: ModelSource | str | Path, slots: int, backend: str = "auto", device: str = "cpu",
                fast: bool = False, options: ServerOptions = ServerOptions(), **deployment):
    """The Serve application: StreamReplica with deployment_options(slots, **deployment), and Fleet. `source`: the
    model (a path: an artifact or a U-Net checkpoint) and a DiT's prompts, as mirage-serve's options give them."""
    gpus = 0.0 if device == "cpu" else 1.0
    source = source if isinstance(source, ModelSource) else ModelSource(Path(source))
    return StreamReplica.options(**deployment_options(slots, gpus=gpus, **deployment)).bind(
        source, slots, backend, "cpu" if device == "cpu" else "cuda", fast, options, Fleet.bind())


def build(args: dict):
    """`serve run mirage.bridge.ray_app:build model=PATH slots=16 device=cuda min_replicas=1 max_replicas=4
    host=0.0.0.0 token=SECRET ...`: the application from `serve run`'s key=value arguments (strings). `host` is
    what Serve's proxies bind (`serve start --http-host`; default 127.0.0.1): anything but loopback needs a
    token, as for mirage-serve. A DiT: dit=CONFIG prompt_embeds=FILE prompt_bank=FILE ... (ModelSource's fields,
    mirage-serve's options)."""
    number = {"slots": int, "min_replicas": int, "max_replicas": int, "target_streams": float, "cpus": float,
              "drain_s": float, "deadline_ms": float, "batch_wait_ms": float, "max_frame_bytes": int,
              "calibrate_steps": int, "strength": float, "max_strength": float}
    args = {k: number.get(k, str)(v) for k, v in args.items()}
    server = {k: args.pop(k) for k in ("host", "token", "deadline_ms", "batch_wait_ms", "max_frame_bytes",
                                       "calibrate_steps") if k in args}
    fast = args.pop("fast", "false").lower() in ("1", "true", "yes")
    fields = ("dit", "lora", "prompt", "prompt_embeds", "text_encoder", "prompt_bank", "strength", "decoder",
              "max_strength", "cache_from")
    source = ModelSource(Path(args.pop("model")), **{k: args.pop(k) for k in fields if k in args})
    slots = args.pop("slots", None) or default_slots(source.path)  # as mirage-serve's --slots
    return application(source, slots, args.pop("backend", "auto"), args.pop("device", "cpu"), fast,
                       ServerOptions(**server, prompt_names=tuple(source.prompt_names), prompt=source.prompt), **args)


# -- the driver (mirage-serve --ray) ------------------------------------------------------------------------
class RayServeError(ServeError):
    """No Ray cluster at the address given, or a replica that could not start (the message says why)."""


def connect(address: str | None) -> bool:
    """Ray, for this process: a local instance (address None; True: started here), or the cluster at
    `address` (HOST:PORT of its head, or auto)."""
    if ray.is_initialized():
        return False
    if address is None:
        os.environ.setdefault(PROXY_ENV, PROXY_CALLBACK)  # before ray.init: its proxy process inherits it
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        return True
    if address != "auto":  # an unreachable address would keep ray.init retrying for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3.0).close()
        except (OSError, ValueError) as e:
            raise RayServeError(f"no Ray cluster reachable at --ray-address {address} ({e}): give the head's "
                                "HOST:PORT (`ray start --head` prints it), or leave --ray-address out for a "
                                "local Ray") from e
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as e:
        raise RayServeError(f"no Ray cluster at --ray-address {address}: {e}") from e
    return False


def deploy(app, host: str, port: int) -> None:
    """Start Serve's HTTP proxies on host:port (an existing Serve keeps its own) and run `app` as APP_NAME,
    returning once every replica has loaded its model; a replica that could not: RayServeError, with the
    application deleted."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the replicas' and proxies' logs stay in Ray's
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # DEPLOY_FAILED: each deployment's status message holds its replica's traceback
        app = serve.status().applications.get(APP_NAME)
        why = [d.message for d in app.deployments.values() if d.message] if app else []
        with suppress(Exception):
            serve.delete(APP_NAME)
        raise RayServeError(f"a replica could not start: {last_error(why[-1] if why else str(e))}") from e


def last_error(text: str) -> str:
    """The last `SomeError: message` line of a traceback (a MirageError's one line), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", (errors or lines or ["(no message)"])[-1])  # mirage.x.YError -> YError


# -- Ray's HTTP proxy ---------------------------------------------------------------------------------
class ReplicaLost:
    """ASGI middleware in Ray's proxy: a WebSocket that its replica ended without a close (its process
    died, so the proxy's call to it failed) gets an `error` message and a 1012 close, instead of a bare
    close that reads like a normal end."""

    MESSAGE = json.dumps({"type": "error", "message": "the server replica holding this stream stopped; "
                          "reconnect for a new stream"})

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        seen = set()

        async def watch_receive():
            msg = await receive()
            seen.add(msg["type"])
            return msg

        async def watch_send(msg):
            seen.add(msg["type"])
            await send(msg)

        await self.app(scope, watch_receive, watch_send)
        if "websocket.accept" in seen and not seen & {"websocket.close", "websocket.disconnect"}:
            with suppress(Exception):  # the client may be gone too
                await send({"type": "websocket.send", "text": self.MESSAGE})
                await send({"type": "websocket.close", "code": LOST, "reason": "replica lost: reconnect"})


def proxy_middlewares() -> list:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=mirage.bridge.ray_app:proxy_middlewares, in the
    environment of `ray start` on every node (mirage-serve --ray sets it for the Ray it starts)."""
    return [Middleware(ReplicaLost)]


__all__ = ["APP_NAME", "PROXY_ENV", "PROXY_CALLBACK", "RayServeError", "connect", "deploy", "LeastLoaded", "Fleet",
           "StreamReplica", "application", "build", "deployment_options", "proxy_middlewares"]
