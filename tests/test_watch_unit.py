"""Pure units of issue 12's core: the watch hub (fan-out, catch-up, lag, compaction),
retention in the store and the applier (compact, keep-versions, snapshots carry them)."""
from __future__ import annotations

import asyncio

import pytest

from kvs_proto import kvs_pb2
from server.applier import Applier
from server.raft.types import NORMAL, Entry
from server.store import VersionedStore
from server.watch import Compacted, Lagged, WatchHub


def change(pos: int, key: str = "key/a", op: str = "put", value: str | None = None):
    return (pos, op, key, pos, value if value is not None else f"value-{pos}", "n1",
            1000.0 + pos, False)


def decode(msg: bytes) -> kvs_pb2.WatchResponse:
    return kvs_pb2.WatchResponse.FromString(msg)


LOOP = asyncio.new_event_loop()   # one loop for the module: watchers' events bind to it


def drain(hub: WatchHub, w, limit: int = 10_000) -> list[int]:
    """Positions of every message available now (runs the coroutine until it would wait)."""
    async def run():
        out = []
        while len(out) < limit:
            try:
                msg = await asyncio.wait_for(hub.next_message(w), 0.01)
            except asyncio.TimeoutError:
                return out
            out.extend(c.position for c in decode(msg).changes)
        return out
    return LOOP.run_until_complete(run())


def test_catch_up_then_live_has_no_gap_and_no_duplicate():
    hub = WatchHub()
    hub.publish([change(i) for i in range(1, 6)], head=5)
    w = hub.open("", 2)
    assert drain(hub, w) == [2, 3, 4, 5]
    assert w.live
    hub.publish([change(6), change(7)], head=7)
    hub.publish([change(9)], head=9)          # position 8 was no change (an invalid item)
    assert drain(hub, w) == [6, 7, 9]


def test_start_zero_means_the_next_change_and_future_start_waits():
    hub = WatchHub()
    hub.publish([change(1), change(2)], head=2)
    now = hub.open("", 0)
    later = hub.open("", 5)
    hub.publish([change(3), change(4), change(5)], head=5)
    assert drain(hub, now) == [3, 4, 5]
    assert drain(hub, later) == [5]


def test_prefix_and_permission_filters():
    hub = WatchHub()
    a = hub.open("app/", 0)
    only_x = hub.open("", 0, allowed=lambda k: k.endswith("x"))
    hub.publish([change(1, "app/x"), change(2, "other/y"), change(3, "app/y"),
                 change(4, "zz/x")], head=4)
    assert drain(hub, a) == [1, 3]
    assert drain(hub, only_x) == [1, 4]


def test_a_batch_is_encoded_once_for_many_watchers():
    hub = WatchHub()
    ws = [hub.open("", 0) for _ in range(50)]
    hub.publish([change(1), change(2), change(3)], head=3)
    assert hub.encoded == 3
    msgs = [LOOP.run_until_complete(hub.next_message(w)) for w in ws]
    assert all(m is msgs[0] for m in msgs), "watchers of everything share one message"
    r = decode(msgs[0])
    assert [c.position for c in r.changes] == [1, 2, 3] and r.head == 3
    assert r.changes[0].chave == "key/a" and r.changes[0].valor == "value-1"


def test_a_laggard_is_cancelled_with_its_resume_position_and_others_go_on():
    hub = WatchHub(watcher_bytes=300)
    slow, fast = hub.open("", 0), hub.open("", 0)
    for i in range(1, 4):      # ~130 bytes each: the third overflows slow's 300 bytes
        hub.publish([change(i, value="v" * 100)], head=i)
        assert drain(hub, fast) == [i]
    with pytest.raises(Lagged) as e:
        drain(hub, slow)
    assert e.value.resume == 1 and e.value.code == "RESOURCE_EXHAUSTED"
    assert "resume from position 1" in str(e.value)
    assert hub.lagged == 1 and slow not in hub.watchers
    # resuming there replays from the ring: nothing lost, nothing twice
    again = hub.open("", e.value.resume)
    assert drain(hub, again) == [1, 2, 3]


def test_batches_a_slow_watcher_has_not_taken_merge_into_one_message():
    hub = WatchHub()
    w = hub.open("", 0)
    for i in range(1, 6):
        hub.publish([change(i)], head=i)
    hub.publish([], head=6)          # position 6 was no change: only the head moves
    assert len(w.queue) == 1
    msg = decode(hub.poll(w))
    assert [c.position for c in msg.changes] == [1, 2, 3, 4, 5] and msg.head == 5
    hub.publish([change(7)], head=7)
    assert drain(hub, w) == [7]


def test_too_many_unmerged_messages_is_lag_too():
    hub = WatchHub(watcher_messages=2)
    w = hub.open("", 0)
    big = "x" * (200 * 1024)    # two of these do not merge (256 KiB per message)
    hub.publish([change(1, value=big)], head=1)
    hub.publish([change(2, value=big)], head=2)
    hub.publish([change(3, value=big)], head=3)
    with pytest.raises(Lagged) as e:
        drain(hub, w)
    assert e.value.resume == 1


def test_lag_by_bytes_keeps_at_least_one_message():
    hub = WatchHub(watcher_bytes=100)
    w = hub.open("", 0)
    hub.publish([change(1, value="x" * 500)], head=1)   # bigger than the bound, but alone
    hub.publish([change(2)], head=2)
    with pytest.raises(Lagged) as e:
        drain(hub, w)
    assert e.value.resume == 1


def test_start_before_the_ring_or_the_compaction_is_refused_with_the_oldest_position():
    hub = WatchHub(ring_changes=5)
    hub.publish([change(i) for i in range(1, 11)], head=10)
    assert hub.oldest() == 6
    with pytest.raises(Compacted) as e:
        hub.open("", 3)
    assert e.value.oldest == 6 and e.value.code == "FAILED_PRECONDITION"
    assert str(e.value).startswith("compacted:") and "oldest available position 6" in str(e.value)
    assert drain(hub, hub.open("", 6)) == [6, 7, 8, 9, 10]
    hub.publish([change(11)], head=11, compacted=8)
    with pytest.raises(Compacted) as e:
        hub.open("", 7)
    assert e.value.oldest == 8


def test_a_catching_up_watcher_overtaken_by_the_ring_ends_compacted():
    hub = WatchHub(ring_changes=3)
    hub.publish([change(i) for i in range(1, 4)], head=3)
    w = hub.open("", 1)
    hub.publish([change(i) for i in range(4, 8)], head=7)   # 1..4 fall out before it reads
    with pytest.raises(Compacted):
        drain(hub, w)


def test_reset_by_a_state_transfer_ends_watchers_that_would_miss_changes():
    hub = WatchHub()
    hub.publish([change(1)], head=1)
    w = hub.open("", 0)
    hub.reset(head=50)
    with pytest.raises(Compacted) as e:
        drain(hub, w)
    assert e.value.oldest == 51
    assert drain(hub, hub.open("", 0)) == []
    assert hub.oldest() == 51


def test_close_all_ends_every_watcher_unavailable():
    hub = WatchHub()
    w = hub.open("", 0)
    hub.close_all("server stopping")
    with pytest.raises(Exception) as e:
        drain(hub, w)
    assert getattr(e.value, "code", "") == "UNAVAILABLE"


# ---------------------------------------------------------------------------
# retention in the store
# ---------------------------------------------------------------------------
def test_store_prune_keeps_the_newest_and_never_reuses_numbers():
    s = VersionedStore()
    for i in range(1, 8):
        s.insert("key", f"val{i}", seq=i)
    assert s.prune("key", 3) == 4
    assert [v.number for v in s.history("key")] == [7, 6, 5]
    assert s.get("key", 2) is None          # a pruned version reads as removed
    assert s.insert("key", "val8", seq=8) == 8
    assert s.prune("key", 0) == 0


def test_store_compact_keeps_the_version_live_at_the_position():
    s = VersionedStore()
    for i, seq in enumerate([1, 3, 4, 5, 8], start=1):
        s.insert("aaa", f"v{i}x", seq=seq)
    s.insert("bbb", "only", seq=2)
    assert s.compact(5) == 2                # v1, v2 superseded before 5 by v3 (seq 4)
    assert [v.seq for v in s.versions("aaa")] == [4, 5, 8]
    assert [v.number for v in s.versions("bbb")] == [1]
    assert s.compact(100) == 2 and [v.number for v in s.versions("aaa")] == [5]


def test_history_page_is_lazy_and_ordered():
    s = VersionedStore()
    for i in range(1, 11):
        s.insert("key", f"val{i}", seq=i)
    s.remove("key", 4)
    assert [v.number for v in s.history_page("key", before=6)] == [5, 3, 2, 1]
    assert [v.number for v in s.history_page("key")][:2] == [10, 9]
    assert list(s.history_page("nope")) == []


# ---------------------------------------------------------------------------
# retention in the applier (the replicated state machine)
# ---------------------------------------------------------------------------
def entry(index: int, *items, ts: float = 1.0) -> Entry:
    return Entry(1, index, NORMAL, {"ts": ts, "items": list(items)})


def put(iid: str, key: str, value: str) -> dict:
    return {"op": "put", "id": iid, "k": key, "v": value, "node": "n1"}


def test_applier_compact_and_retain_are_deterministic_log_changes():
    a = Applier()
    a.feed = []
    idx = 0
    for i in range(1, 7):
        idx += 1
        a.apply(entry(idx, put(f"p{i}", "key", f"val{i}")))
    idx += 1
    [(_, o)] = a.apply(entry(idx, {"op": "compact", "id": "c1", "pos": 99, "node": "n1"}))
    assert o.version == -1 and "beyond the last applied position 6" in o.reason
    idx += 1
    [(_, o)] = a.apply(entry(idx, {"op": "compact", "id": "c2", "pos": 4, "node": "n1"}))
    assert o.version == 2 and a.compacted == 4              # v1, v2 dropped; v3 was live at 4
    idx += 1
    [(_, o)] = a.apply(entry(idx, {"op": "compact", "id": "c3", "pos": 3, "node": "n1"}))
    assert o.version == -1 and o.reason.startswith("compacted:")
    idx += 1
    [(_, o)] = a.apply(entry(idx, {"op": "retain", "id": "r1", "keep": 2, "node": "n1"}))
    assert o.version == 2 and a.keep == 2
    idx += 1
    a.apply(entry(idx, put("p7", "key", "val7")))
    assert [v.number for v in a.store.history("key")] == [7, 6]
    # the feed saw the puts only, with their positions
    feed = a.take_changes()
    assert [(c[0], c[1], c[3]) for c in feed] == [(i, "put", i) for i in range(1, 7)] + \
        [(11, "put", 7)]
    # a replay of the same ids changes nothing
    before = a.changes
    a.apply(entry(idx + 1, {"op": "compact", "id": "c2", "pos": 4, "node": "n1"}))
    assert a.changes == before
    # snapshots carry the policy and the compaction
    b = Applier()
    meta, keys = a.export()
    b.load(keys, meta)
    assert (b.keep, b.compacted) == (2, 4)
    assert [v.number for v in b.store.history("key")] == [7, 6]
    b.apply(entry(idx + 2, put("p8", "key", "val8")))
    assert [v.number for v in b.store.history("key")] == [8, 7]


def test_applier_records_removes_for_watchers():
    a = Applier()
    a.feed = []
    a.apply(entry(1, put("a", "key", "one"), put("b", "key", "two")))
    a.apply(entry(2, {"op": "del", "id": "c", "k": "key", "ver": 1, "node": "n2"},
                  {"op": "del", "id": "d", "k": "key", "ver": None, "node": "n2"},
                  {"op": "del", "id": "e", "k": "key", "ver": None, "node": "n2"}))
    feed = a.take_changes()
    assert [(c[0], c[1], c[3], c[7]) for c in feed] == [
        (1, "put", 1, False), (2, "put", 2, False), (3, "remove", 1, False),
        (4, "remove", 2, True)]        # position 5 removed nothing: no change
    assert Applier().feed is None      # nothing is recorded unless asked


# ---------------------------------------------------------------------------
# seeded schedules: publishes, slow and fast consumers, resumes after lag
# ---------------------------------------------------------------------------
def _try_next(hub: WatchHub, w):
    """The watcher's next message if one is ready now, else None (never blocks)."""
    return hub.poll(w)


@pytest.mark.parametrize("seed", range(300))
def test_seeded_schedules_every_subscriber_sees_each_change_once_in_order(seed, monkeypatch):
    import random

    import server.watch
    rnd = random.Random(seed)
    monkeypatch.setattr(server.watch, "PAGE_CHANGES", rnd.randint(1, 4))   # catch-up pages
    hub = WatchHub(ring_changes=rnd.randint(5, 60), watcher_messages=rnd.randint(1, 6),
                   watcher_bytes=rnd.choice([200, 2000, 1 << 20]))
    keys = ["a/1", "a/2", "b/1", "ab/3"]
    log: list[tuple[int, str]] = []          # every change published: (position, key)
    pos = 0
    subs = []                                # [prefix, first, watcher, received positions, done]

    def expected(prefix, first):
        return [p for p, k in log if p >= first and k.startswith(prefix)]

    for step in range(rnd.randint(30, 120)):
        r = rnd.random()
        if r < 0.35:                         # a batch is applied
            batch = []
            for _ in range(rnd.randint(0, 4)):
                pos += rnd.randint(1, 2)     # some positions are no change
                batch.append(change(pos, rnd.choice(keys), value="v" * rnd.randint(3, 80)))
            head = pos + rnd.randint(0, 1)
            pos = head
            hub.publish(batch, head)
            log.extend((c[0], c[2]) for c in batch)
        elif r < 0.45 or not subs:           # a new subscriber
            prefix = rnd.choice(["", "a/", "b/", "ab"])
            start = rnd.choice([0, 0, max(1, hub.head - rnd.randint(0, 10)), hub.head + 2])
            try:
                w = hub.open(prefix, start)
            except Compacted as e:
                assert start < e.oldest
                continue
            subs.append([prefix, w.next, w, [], False])
        else:                                # a subscriber reads a few messages
            sub = rnd.choice(subs)
            prefix, first, w, got, done = sub
            if done:
                continue
            for _ in range(rnd.randint(1, 3)):
                try:
                    msg = _try_next(hub, w)
                except Lagged as e:
                    want_next = got[-1] + 1 if got else first
                    assert e.resume >= want_next and not [p for p in expected(prefix, want_next)
                                                          if p < e.resume], \
                        f"seed {seed}: lag resume {e.resume} skips changes"
                    try:
                        sub[2] = w = hub.open(prefix, e.resume)
                    except Compacted as c:
                        assert e.resume < c.oldest
                        sub[4] = True
                        break
                    continue
                except Compacted as e:
                    assert (got[-1] + 1 if got else first) < e.oldest
                    sub[4] = True
                    break
                if msg is None:
                    break
                got.extend(c.position for c in decode(msg).changes)
    # drain everyone that is still going: each saw exactly its changes, once, in order
    for prefix, first, w, got, done in subs:
        if done:
            continue
        while True:
            try:
                msg = _try_next(hub, w)
            except (Lagged, Compacted):
                break   # checked above for the prefix it delivered
            if msg is None:
                break
            got.extend(c.position for c in decode(msg).changes)
        want = expected(prefix, first)
        assert got == want[:len(got)], f"seed {seed}: {prefix!r} from {first}: {got} vs {want}"
        if w.error is None:
            assert got == want, f"seed {seed}: a live subscriber missed changes"
