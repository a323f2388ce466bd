"""The attack suite's well-behaved client, in a process of its own (so that the attackers' work in the
test process does not delay its sends or its clock):

    python tests/serve_client.py URL TOKEN RATE

For each line `SECONDS` on stdin: connects to URL/ws with `Authorization: Bearer TOKEN`, prints "ready"
once it has its `hello`, sends a 32x32 JPEG every 1/RATE s for SECONDS, closes, and prints the JSON list
of its replies' arrival times (seconds after its first send). Ends at the end of stdin.
"""
from __future__ import annotations

import asyncio
import io
import json
import struct
import sys
import time

import aiohttp
import numpy as np
from PIL import Image

HEADER = struct.Struct("<IB3xd")  # as mirage.runtime.server.HEADER (not imported: this process stays light)
JPEG = 1


async def stream(session, url: str, token: str, rate: float, seconds: float) -> list[float]:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "JPEG")
    body = out.getvalue()
    ws = await session.ws_connect(url + "/ws", headers={"Authorization": f"Bearer {token}"})
    assert (await ws.receive_json())["type"] == "hello"
    print("ready", flush=True)
    arrivals = []

    async def read():
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                arrivals.append(time.monotonic())
    reader = asyncio.create_task(read())
    start = time.monotonic()
    for n in range(int(seconds * rate)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await ws.send_bytes(HEADER.pack(n, JPEG, time.monotonic()) + body)
    await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))
    await ws.close()
    await reader
    return [t - start for t in arrivals]


async def main(url: str, token: str, rate: float) -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps(await stream(session, url, token, rate, float(line))), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
