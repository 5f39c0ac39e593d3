"""A TCP relay that delays every byte by a fixed time each way: a WAN's latency where ``tc netem`` is not
available (the relay adds ``delay`` seconds to each direction, so 2 x ``delay`` to a round trip).

``python tests/support/delay.py --delay 0.04 LISTEN_HOST:PORT=TARGET_HOST:PORT ...`` relays each listening
address to its target until it is stopped. Data keep their order; each chunk read is written once
``delay`` has passed since it was read, so the relay adds latency, not a bandwidth limit. Standard library
only (asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while data := await reader.read(CHUNK):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _relay_connection(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: tuple[str, int], delay: float
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(_pump(client_reader, server_writer, delay), _pump(server_reader, client_writer, delay))
    except (ConnectionError, OSError):
        pass
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


async def relay(routes: Sequence[tuple[tuple[str, int], tuple[str, int]]], delay: float) -> None:
    """Listen on each route's first address and relay every connection to its second, ``delay`` each way."""
    servers = []
    for listen, target in routes:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target=target) -> None:
            await _relay_connection(reader, writer, target, delay)

        servers.append(await asyncio.start_server(handle, listen[0], listen[1]))
    print(f"relaying {len(routes)} address(es) with {delay * 1000:.0f} ms each way", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/support/delay.py", description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds added to each direction")
    parser.add_argument("routes", nargs="+", help="LISTEN_HOST:PORT=TARGET_HOST:PORT")
    args = parser.parse_args(argv)
    routes = []
    for route in args.routes:
        listen, _, target = route.partition("=")
        try:
            routes.append((_address(listen), _address(target)))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay(routes, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
