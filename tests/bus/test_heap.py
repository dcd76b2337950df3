"""A hub's C heap keeps the memory of large received messages for the next ones (dpipes.bus.heap)."""

from __future__ import annotations

import asyncio
import platform
import resource

import pytest

from dpipes.bus.endpoint import Endpoint
from tests.bus.test_hub import WAIT_S, linked

MIB = 1 << 20
MESSAGES = 64
PAGES_PER_MESSAGE = MIB // resource.getpagesize()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


async def send_and_read(src: Endpoint, sink: Endpoint, payload: bytes) -> None:
    async def send() -> None:
        stream = src.open_stream(sink.addr)
        for _ in range(MESSAGES):
            await stream.send_bytes(payload)
        await stream.close(timeout=WAIT_S)

    sending = asyncio.create_task(send())
    reader = await sink.accept(timeout=WAIT_S)
    while await reader.read(timeout=WAIT_S) is not None:
        pass
    await sending


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")
async def test_a_hub_receiving_1mib_messages_over_tcp_does_not_fault_their_memory_in_each_time() -> None:
    payload = bytes(MIB)
    async with linked("alpha", "beta") as (a, b):
        src, sink = a.endpoint("src"), b.endpoint("sink")
        await send_and_read(src, sink, payload)  # the heap grows to what is in flight once
        before = minor_faults()
        await send_and_read(src, sink, payload)
        faults = minor_faults() - before
    # glibc's defaults gave each freed message's pages back and faulted the next one's in: a page
    # fault per page of every message. Now the memory is reused; a few faults are other work.
    assert faults < MESSAGES * PAGES_PER_MESSAGE // 4, f"{faults} page faults for {MESSAGES} 1 MiB messages"
