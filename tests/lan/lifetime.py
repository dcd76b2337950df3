"""How a LAN test ends what it started in a host: a bounded wait, then SIGKILL, so nothing outlives it."""

from __future__ import annotations

import asyncio
import signal

STOP_TIMEOUT_S = 15.0  # a daemon's orderly stop (BYE on every link, mDNS goodbye) on 2 busy cores


async def reap(proc: asyncio.subprocess.Process, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait for ``proc`` to exit under ``timeout_s``; kill it when it does not."""
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def stop(proc: asyncio.subprocess.Process, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``proc`` if it still runs, then :func:`reap` it."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await reap(proc, timeout_s)
