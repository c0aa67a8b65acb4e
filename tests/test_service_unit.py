"""Pure units of the asyncio serving path: reads that wait for the node to get in step."""
from __future__ import annotations

import asyncio
import time


class _NotYetReadableLog:
    """A node that gets in step after ``delay`` seconds (or never)."""

    node = "n1"

    def __init__(self, delay: float | None, read_wait: float = 3.0):
        self.ready_at = None if delay is None else time.monotonic() + delay
        self.cfg = type("Cfg", (), {"read_wait": read_wait})()

    def readable_now(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    def unreadable_reason(self) -> str:
        return "server n1 is not in step with the cluster (catching-up)"

    async def wait_readable(self, timeout: float) -> bool:
        """As the node's: returns when it got in step (here: at ``ready_at``) or after
        ``timeout``."""
        left = timeout if self.ready_at is None else self.ready_at - time.monotonic()
        await asyncio.sleep(max(0.0, min(timeout, left)))
        return self.readable_now()


def test_many_waiting_reads_do_not_starve_worker_threads():
    from server.service import unreadable

    node = _NotYetReadableLog(delay=0.5)

    async def main():
        waits = [asyncio.create_task(unreadable(node)) for _ in range(50)]
        # While 50 reads wait, a worker-thread job (what Snapshot / FetchState use) runs at once.
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        thread_latency = time.monotonic() - t0
        reasons = await asyncio.wait_for(asyncio.gather(*waits), 5)
        return thread_latency, reasons

    thread_latency, reasons = asyncio.run(main())
    assert thread_latency < 0.4, f"a worker thread was free only after {thread_latency:.2f}s"
    assert reasons == [None] * 50  # all served once the node got in step


def test_a_read_that_waits_too_long_gets_the_reason():
    from server.service import unreadable

    reason = asyncio.run(asyncio.wait_for(unreadable(_NotYetReadableLog(None, read_wait=0.1)), 5))
    assert reason and "not in step" in reason
