"""A hub in its own process, for tests that kill it or need a second process.

Usage: python hubproc.py ROLE ARGS...; it prints its TCP endpoint on the first line of stdout.

Roles:
  sink NAME            a hub NAME with an endpoint "sink" that accepts streams and never reads them
  sink-ipc NAME        the same, printing its IPC endpoint instead (for clients on this host)
  blast IPC N SIZE NODE [RESERVE]
                       a client attached over IPC (with a shared-memory reserve of RESERVE
                       bytes) that streams N messages of SIZE bytes to "<node>/sink", waits
                       for EOF_ACK, prints "acked TOTAL" and exits at once
"""

from __future__ import annotations

import asyncio
import sys

from dpipes.bus.client import Client
from dpipes.bus.hub import Hub


async def sink(name: str, *, ipc: bool = False) -> None:
    async with Hub(name) as hub:
        ep = hub.endpoint("sink")
        print(hub.ipc_endpoint if ipc else hub.tcp_endpoint, flush=True)
        streams = []
        while True:
            streams.append(await ep.accept())  # held, never read: the sender runs out of credit


async def blast(ipc: str, count: int, size: int, node: str, reserve: int = 0) -> None:
    async with Client(ipc, name="blaster", shm_reserve=reserve) as client:
        print(client.endpoint.addr, flush=True)
        stream = client.endpoint.open_stream(f"{node}/sink")
        for i in range(count):
            await stream.send_bytes(i.to_bytes(8, "big") * (size // 8))
        total = await stream.close(timeout=60)
        print(f"acked {total}", flush=True)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "sink":
        asyncio.run(sink(args[0]))
    elif role == "sink-ipc":
        asyncio.run(sink(args[0], ipc=True))
    elif role == "blast":
        asyncio.run(blast(args[0], int(args[1]), int(args[2]), args[3], *map(int, args[4:5])))
