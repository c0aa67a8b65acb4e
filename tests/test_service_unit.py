"""Pure units of the asyncio serving path: result delivery and store access from the loop."""
from __future__ import annotations

import asyncio
import threading
import time

from server.log import LoopCompletions, Outcome
from server.service import _with_store
from server.store import VersionedStore


class _FakeLog:
    """Only what ``_with_store`` touches: a store and its lock."""

    def __init__(self):
        self.store = VersionedStore()
        self.store.insert("key", "value", 1, 0.0, "n1")
        self.store_lock = threading.Lock()


def test_loop_completions_deliver_from_another_thread_in_one_wakeup():
    async def main():
        loop = asyncio.get_running_loop()
        completions = LoopCompletions(loop)
        futures = [completions.new() for _ in range(3)]
        scheduled = []
        real = loop.call_soon_threadsafe

        def counting(*args):
            scheduled.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counting
        pairs = [(f, Outcome(i + 1)) for i, f in enumerate(futures)]
        t = threading.Thread(target=completions.deliver, args=(pairs,))
        t.start()
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        t.join()
        return results, len(scheduled)

    results, wakeups = asyncio.run(main())
    assert [r.version for r in results] == [1, 2, 3]
    assert wakeups == 1


def test_loop_completions_ignore_already_resolved_and_closed_loop():
    loop = asyncio.new_event_loop()
    completions = LoopCompletions(loop)
    fut = loop.create_future()
    fut.set_result(Outcome(7))
    completions.deliver([(fut, Outcome(-1, "late"))])
    loop.run_until_complete(asyncio.sleep(0))
    assert fut.result().version == 7  # the first result stands
    loop.close()
    completions.deliver([(fut, Outcome(-1, "after close"))])  # no exception


def test_with_store_reads_at_once_when_the_lock_is_free():
    rlog = _FakeLog()
    found = asyncio.run(_with_store(rlog, VersionedStore.get, "key", None))
    assert found is not None and found.value == "value"


def test_with_store_does_not_stall_the_loop_while_the_lock_is_held():
    rlog = _FakeLog()
    rlog.store_lock.acquire()
    released = threading.Event()

    def release_later():
        released.wait(5)
        rlog.store_lock.release()

    threading.Thread(target=release_later, daemon=True).start()

    async def main():
        read = asyncio.create_task(_with_store(rlog, VersionedStore.get, "key", None))
        # The loop keeps running other work while the read waits for the lock.
        ticks = 0
        deadline = time.monotonic() + 5
        while ticks < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
            ticks += 1
        assert not read.done()
        released.set()
        return ticks, await asyncio.wait_for(read, 5)

    ticks, found = asyncio.run(main())
    assert ticks == 10
    assert found is not None and found.number == 1


class _NotYetReadableLog(_FakeLog):
    """A node that gets in step after ``delay`` seconds (or never)."""

    node = "n1"

    def __init__(self, delay: float | None, read_wait: float = 3.0):
        super().__init__()
        self.ready_at = None if delay is None else time.monotonic() + delay
        self.cfg = type("Cfg", (), {"read_wait": read_wait})()

    def readable_now(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    def unreadable_reason(self) -> str:
        return "server n1 is not in step with the cluster (catching-up)"


def test_many_waiting_reads_do_not_starve_worker_threads():
    from server.service import KVSServicer

    servicer = KVSServicer(_NotYetReadableLog(delay=0.5), write_timeout=10)

    async def main():
        waits = [asyncio.create_task(servicer._unreadable()) for _ in range(50)]
        # While 50 reads wait, a worker-thread job (what Status / FetchLog use) runs at once.
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        thread_latency = time.monotonic() - t0
        reasons = await asyncio.wait_for(asyncio.gather(*waits), 5)
        return thread_latency, reasons

    thread_latency, reasons = asyncio.run(main())
    assert thread_latency < 0.4, f"a worker thread was free only after {thread_latency:.2f}s"
    assert reasons == [None] * 50  # all served once the node got in step


def test_a_read_that_waits_too_long_gets_the_reason():
    from server.service import KVSServicer

    servicer = KVSServicer(_NotYetReadableLog(delay=None, read_wait=0.1), write_timeout=10)
    reason = asyncio.run(asyncio.wait_for(servicer._unreadable(), 5))
    assert reason and "not in step" in reason
