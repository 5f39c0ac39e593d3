"""The delaying TCP relay (the WAN latency of the real-network benchmark where tc netem is missing)."""

from __future__ import annotations

import asyncio
import time

from support.delay import relay

from patchsvdd.system.probes import free_port


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trips(delay: float) -> tuple[list[float], bytes]:
    echo_port, relay_port = free_port(), free_port()
    echo = await asyncio.start_server(_echo, "127.0.0.1", echo_port)
    relaying = asyncio.create_task(relay([(("127.0.0.1", relay_port), ("127.0.0.1", echo_port))], delay))
    for _ in range(100):  # until the relay listens
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            break
        except OSError:
            await asyncio.sleep(0.02)
    times, received = [], b""
    payload = bytes(range(256)) * 4096  # 1 MiB: order and content must survive
    for message in (b"ping", payload):
        start = time.perf_counter()
        writer.write(message)
        await writer.drain()
        got = b""
        while len(got) < len(message):
            got += await reader.read(65536)
        times.append(time.perf_counter() - start)
        received = got
    writer.close()
    relaying.cancel()
    echo.close()
    return times, received


def test_the_relay_adds_its_delay_each_way_and_keeps_the_bytes() -> None:
    times, received = asyncio.run(_round_trips(0.05))
    assert times[0] >= 0.1  # 50 ms each way: a round trip through the relay takes at least 100 ms
    assert received == bytes(range(256)) * 4096
    plain, _ = asyncio.run(_round_trips(0.0))
    assert plain[0] < 0.1
