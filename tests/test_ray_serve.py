"""mirage-serve --ray on the CPU: a local Ray (2 CPUs, no dashboard) started once for the module, the
application with two CPU replicas of the bundled tiny-v2v (2 slots each) behind Ray Serve's proxy on
127.0.0.1, aiohttp clients. Ray's start and the replicas' model loads are most of this file's time."""
import asyncio
import importlib.util
import json
import os
import signal
import socket
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mirage.cli.serve import main as serve_cli

from conftest import CKPT_GEN, CKPT_V2V

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import ClientSession, WSMsgType  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from mirage.bridge.pipeline import load_pipeline  # noqa: E402
from mirage.runtime.pool import StreamPool  # noqa: E402
from mirage.runtime.server import HEADER, RAW, ServerOptions, make_app  # noqa: E402

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed")
SIZE, SLOTS, TIMEOUT = 32, 2, 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()  # Serve's proxy: one per Ray instance, so every test of the module uses this one
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def ray_instance():
    import ray
    from ray import serve

    from mirage.bridge.ray_app import PROXY_CALLBACK, PROXY_ENV

    os.environ[PROXY_ENV] = PROXY_CALLBACK  # Ray's processes inherit it: the proxy tells streams of a dead replica
    start = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"\nray.init: {time.monotonic() - start:.1f} s")
    yield
    serve.shutdown()
    ray.shutdown()
    del os.environ[PROXY_ENV]


@pytest.fixture(scope="module")
def fleet(ray_instance):
    """Two replicas of tiny-v2v, SLOTS streams each; the deadline far off, so that lockstep clients on a
    loaded machine lose no frame."""
    from mirage.bridge.ray_app import application, deploy

    start = time.monotonic()
    deploy(application(CKPT_V2V, SLOTS, device="cpu", options=ServerOptions(deadline_ms=5000.0), min_replicas=2,
                       max_replicas=2, cpus=0.5), "127.0.0.1", PORT)
    print(f"\nserve.run, two replicas: {time.monotonic() - start:.1f} s")


def run(scenario, timeout: float = TIMEOUT):
    async def bounded():
        async with ClientSession() as session:
            return await asyncio.wait_for(scenario(session), timeout)
    return asyncio.run(bounded())


async def connect(session, **query):
    ws = await session.ws_connect(URL + "/ws", params={k: str(v) for k, v in query.items()})
    return ws, await ws.receive_json()


async def reply(ws):
    """The next frame's (id, payload), or a control message other than stats."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            return HEADER.unpack_from(msg.data)[0], msg.data[HEADER.size:]
        if msg.type != WSMsgType.TEXT:
            return msg
        data = json.loads(msg.data)
        if data["type"] != "stats":
            return data


def frames(seed: int, n: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


async def lockstep(ws, inputs, start: int = 0) -> list[bytes]:
    out = []
    for n, rgb in enumerate(inputs, start):
        await ws.send_bytes(HEADER.pack(n, RAW, 0.0) + rgb.tobytes())
        frame_id, body = await reply(ws)
        assert frame_id == n
        out.append(body)
    return out


async def health(session, until=lambda h: True, timeout: float = 10.0) -> dict:
    """/health, polled until `until` holds (replicas report twice a second)."""
    end = time.monotonic() + timeout
    while True:
        async with session.get(URL + "/health") as r:
            h = await r.json()
        if until(h) or time.monotonic() > end:
            return h
        await asyncio.sleep(0.2)


def test_ray_missing_is_one_line_and_status_2(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    result = CliRunner().invoke(serve_cli, ["--ray"])
    assert result.exit_code == 2 and "needs Ray Serve: pip install 'mirage-video[ray]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_ray
def test_no_ray_cluster_at_the_address_is_one_line_and_status_2():
    result = CliRunner().invoke(serve_cli, ["--ray-address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 2 and "no Ray cluster reachable at --ray-address" in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_ray
def test_a_replica_that_cannot_load_the_model_is_one_line_and_status_2(ray_instance, tmp_path):
    result = CliRunner().invoke(serve_cli, [str(tmp_path), "--ray", "--device", "cpu", "--port", str(PORT)])
    assert result.exit_code == 2, result.output
    assert "a replica could not start" in result.output and "neither an artifact" in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_ray
def test_deployment_options_follow_slots_and_replicas():
    from mirage.bridge.ray_app import deployment_options

    fixed = deployment_options(16, 2, 2, gpus=1)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 17 and fixed["ray_actor_options"]["num_gpus"] == 1
    scaled = deployment_options(16, 1, 8, drain_s=60)["autoscaling_config"]
    assert (scaled["min_replicas"], scaled["max_replicas"], scaled["target_ongoing_requests"]) == (1, 8, 12)
    assert deployment_options(16, 1, 8, drain_s=60)["graceful_shutdown_timeout_s"] == 60
    with pytest.raises(ValueError):
        deployment_options(4, 3, 2)


@needs_ray
def test_serve_run_s_builder_takes_strings_and_keeps_the_token_rule():
    from mirage.bridge.ray_app import build
    from mirage.runtime.server import ServeError

    app = build({"model": str(CKPT_V2V), "slots": "3", "max_replicas": "4", "host": "0.0.0.0", "token": "t"})
    replica = app._bound_deployment
    assert replica.max_ongoing_requests == 4 and replica._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ServeError, match="--token"):
        build({"model": str(CKPT_V2V), "host": "0.0.0.0"})


@needs_ray
def test_serve_run_s_builder_takes_a_dit_and_its_prompts_and_a_replica_opens_them():
    """A replica receives the model as mirage-serve's options describe it (pickled) and opens the DiT with its
    starting prompt and its bank; the hello offers the bank's names."""
    import pickle

    from mirage.bridge.ray_app import build
    from mirage.core.prompts import read_embeddings

    dit = CKPT_V2V.parent / "dit-tiny-taesd"
    app = build({"model": str(dit), "dit": "dit-tiny-taesd", "prompt": "trained",
                 "prompt_bank": str(dit / "prompts.safetensors")})
    source, *_, options, _ = app._bound_deployment.init_args
    assert options.prompt_names == ("empty", "trained")
    replica_s = pickle.loads(pickle.dumps(source))
    with StreamPool.open(replica_s.path, 1, device="cpu", load=replica_s.load) as pool:
        assert pool.controls == {"prompt": True}  # a prompt encoder: the bank's
        np.testing.assert_array_equal(pool.pipeline.prompt_encoder("trained"),
                                      read_embeddings(dit / "prompt.safetensors"))


@needs_ray
def test_streams_spread_over_replicas_and_busy_when_every_one_is_full(fleet):
    async def scenario(session):
        opened = [await connect(session, seed=n) for n in range(2 * SLOTS)]
        replicas = [hello["replica"] for _, hello in opened]
        assert all(hello["type"] == "hello" for _, hello in opened)
        assert sorted(replicas.count(r) for r in set(replicas)) == [SLOTS, SLOTS]  # two replicas, full
        h = await health(session, lambda h: h["active"] == 2 * SLOTS)
        assert (h["replicas"], h["slots"], h["active"]) == (2, 2 * SLOTS, 2 * SLOTS)
        assert sorted(r["replica"] for r in h["per_replica"]) == sorted(set(replicas))
        ws, busy = await connect(session)
        assert busy["type"] == "busy"
        assert (await ws.receive()).type == WSMsgType.CLOSE and ws.close_code == 1013
        await opened[0][0].close()  # its slot frees; the next stream gets it, on that replica
        await health(session, lambda h: h["active"] == 2 * SLOTS - 1)
        ws, hello = await connect(session)
        assert hello["type"] == "hello" and hello["replica"] == replicas[0]
        for ws, _ in [(ws, None), *opened[1:]]:
            await ws.close()
        async with session.get(URL + "/") as page:
            assert page.status == 200 and "<canvas" in await page.text()
        async with session.get(URL + "/static/app.js") as script:
            assert script.status == 200
    run(scenario)


@needs_ray
def test_frames_are_bit_identical_to_mirage_serve(fleet):
    inputs = frames(3, 4)

    async def through_ray(session):
        ws, _ = await connect(session, seed=7)
        out = await lockstep(ws, inputs)
        await ws.close()
        return out

    async def through_mirage_serve():
        pool = StreamPool.open(CKPT_V2V, slots=SLOTS, device="cpu", load=load_pipeline)
        try:
            app = make_app(pool, ServerOptions(deadline_ms=5000.0))
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                ws = await client.ws_connect("/ws", params={"seed": "7"})
                await ws.receive_json()
                return await lockstep(ws, inputs)
        finally:
            pool.close()

    served = run(through_ray)
    direct = asyncio.run(asyncio.wait_for(through_mirage_serve(), TIMEOUT))
    assert len(served) == 4 and all(a == b for a, b in zip(served, direct))
    assert served[0] != served[1]  # frames of a moving stream, not a constant


@needs_ray
def test_bad_input_gets_mirage_serve_s_answers(fleet):
    async def scenario(session):
        ws, _ = await connect(session)
        await ws.send_bytes(b"short")
        assert "16-byte header" in (await reply(ws))["message"]
        await ws.send_str("hello?")
        assert "binary messages" in (await reply(ws))["message"]
        assert len(await lockstep(ws, frames(1, 1))) == 1  # the stream goes on
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(URL + "/ws", params={"seed": "abc"})
        assert refused.value.status == 400
    run(scenario)


@needs_ray
def test_a_killed_replica_tells_its_streams_and_the_others_stream_on(fleet):
    """Near the end of the module: the killed replica is restarting afterwards."""
    async def scenario(session):
        (a, hello_a), (b, hello_b) = await connect(session, seed=1), await connect(session, seed=2)
        assert hello_a["replica"] != hello_b["replica"]
        h = await health(session)
        pid = next(r["pid"] for r in h["per_replica"] if r["replica"] == hello_a["replica"])
        await lockstep(a, frames(1, 2))
        times = []

        async def stream_b():  # b streams all along; its frame times show any stall
            n = 0
            while True:
                await lockstep(b, frames(n, 1), n)
                times.append(time.monotonic())
                n += 1

        streaming = asyncio.create_task(stream_b())
        while len(times) < 5:
            await asyncio.sleep(0.05)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        told = await reply(a)
        told_s = time.monotonic() - killed
        closed = await a.receive()
        while len(times) < 15:
            await asyncio.sleep(0.05)
        streaming.cancel()
        gaps = np.diff(times)
        before, after = gaps[:4], gaps[5:]
        print(f"\nkilled replica: told in {1e3 * told_s:.0f} ms; the other stream's frame gaps: "
              f"before {1e3 * before.max():.0f} ms max, after {1e3 * after.max():.0f} ms max")
        assert told["type"] == "error" and "reconnect" in told["message"] and told_s < 1.0
        assert closed.type == WSMsgType.CLOSE and a.close_code == 1012
        assert after.max() < max(3 * np.median(before), 0.5)  # nothing of the kill reached b's replica
        ws, hello = await connect(session)  # the reconnect lands on the live replica
        assert hello["type"] == "hello" and hello["replica"] == hello_b["replica"]
        await ws.close()
        await b.close()
    run(scenario)


@needs_ray
def test_a_redeploy_with_a_new_model_drains_the_old_replicas_without_cutting_their_streams(fleet):
    """Near the end of the module: the application then serves the generation model."""
    from mirage.bridge.ray_app import application, deploy

    async def scenario(session):
        old = {r["replica"] for r in (await health(session, lambda h: h["replicas"] == 2, 60.0))["per_replica"]}
        ws, hello = await connect(session, seed=4)
        assert hello["video_to_video"] and hello["replica"] in old
        await lockstep(ws, frames(4, 2))
        new_app = application(CKPT_GEN, SLOTS, device="cpu", options=ServerOptions(deadline_ms=5000.0),
                              min_replicas=2, max_replicas=2, cpus=0.5)
        deploying = asyncio.get_running_loop().run_in_executor(None, deploy, new_app, "127.0.0.1", PORT)
        n, end = 2, time.monotonic() + 60.0
        while time.monotonic() < end:  # the old stream streams on while the new replicas load
            await lockstep(ws, frames(n, 1), n)
            n += 1
            h = await health(session)
            if len({r["replica"] for r in h["per_replica"]} - old) == 2:
                break
        ws_new, hello_new = await connect(session)  # a new stream: the new model, on a new replica
        assert hello_new["type"] == "hello" and not hello_new["video_to_video"] and hello_new["replica"] not in old
        assert len(await lockstep(ws, frames(20, 3), n)) == 3  # the old replica still serves its stream
        draining = next(r for r in h["per_replica"] if r["replica"] == hello["replica"])
        assert draining["active"] == 1
        await ws.close()
        await ws_new.close()
        await asyncio.wait_for(deploying, 60.0)
        h = await health(session, lambda h: not {r["replica"] for r in h["per_replica"]} & old, 30.0)
        assert not {r["replica"] for r in h["per_replica"]} & old and h["video_to_video"] is False
    run(scenario, timeout=150.0)


@needs_ray
def test_replicas_scale_up_with_open_streams(fleet):
    """Last in the module: one replica of the generation model, up to two, aiming at one stream each."""
    from mirage.bridge.ray_app import application, deploy

    deploy(application(CKPT_GEN, SLOTS, device="cpu", min_replicas=1, max_replicas=2, target_streams=1, cpus=0.5),
           "127.0.0.1", PORT)

    async def scenario(session):
        assert (await health(session, lambda h: h["replicas"] == 1, 30.0))["replicas"] == 1
        opened = [await connect(session) for _ in range(2)]  # both fit the one replica: 2 streams, 1 wanted each
        assert len({hello["replica"] for _, hello in opened}) == 1
        start = time.monotonic()
        h = await health(session, lambda h: h["replicas"] == 2, 60.0)
        print(f"\nscaled up to {h['replicas']} replicas {time.monotonic() - start:.1f} s after 2 streams opened")
        assert h["replicas"] == 2 and h["slots"] == 2 * SLOTS and h["active"] == 2
        # the next stream goes to the new, empty replica, once the proxy's router has it: /health counts it
        # from the replica's own report, which can come a moment before the router's view (then: busy)
        for _ in range(20):
            ws, hello = await connect(session)
            if hello["type"] == "hello":
                break
            assert hello["type"] == "busy", hello
            await ws.close()
            await asyncio.sleep(0.5)
        assert hello["replica"] not in {hello["replica"] for _, hello in opened}
        for ws, _ in [(ws, None), *opened]:
            await ws.close()
    run(scenario, timeout=120.0)
