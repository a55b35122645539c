"""A TCP forwarder for the cluster suite: `python -m tests.cluster.forward LISTEN_HOST PORT TO_HOST TO_PORT`.

The provider sandbox binds loopback only (it refuses anything else); in the cluster's "core"
namespace this makes it reachable from the other hosts on the bridge address.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen: str, port: int, to_host: str, to_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen, port, backlog=512)
    print(f"forwarding {listen}:{port} -> {to_host}:{to_port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host, port, to_host, to_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    asyncio.run(main(host, port, to_host, to_port))
