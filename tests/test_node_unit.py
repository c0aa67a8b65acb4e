"""Pure units of the driver's bookkeeping: the wait tracker and the applier
(the replicated state machine over the store)."""
from __future__ import annotations

import asyncio

from server.applier import Applier, conf_from_json, conf_to_json
from server.raft import membership
from server.raft.types import CONF, NOOP, NORMAL, ConfState, Entry
from server.waiters import Outcome, Waiters


def _put(iid, k, v, node="n1"):
    return {"id": iid, "op": "put", "k": k, "v": v, "node": node}


def _entry(index, *items, term=1):
    return Entry(term, index, NORMAL, {"ts": 1.5, "items": list(items)})


def test_applier_assigns_versions_at_apply_and_applies_an_id_once():
    a = Applier()
    out = a.apply(_entry(1, _put("x1", "key", "v01"), _put("x2", "key", "v02")))
    assert out == [("x1", Outcome(1)), ("x2", Outcome(2))]
    # The same change proposed twice (a retry after a lost forward) reaches the log twice:
    # the second copy answers with the first outcome and changes nothing.
    out = a.apply(_entry(2, _put("x1", "key", "v01"), _put("x3", "key", "v03")))
    assert out == [("x1", Outcome(1)), ("x3", Outcome(3))]
    assert [v.value for v in a.store.history("key")] == ["v03", "v02", "v01"]
    assert a.index == 2 and a.changes == 3


def test_applier_removes_and_reports_reasons():
    a = Applier()
    a.apply(_entry(1, _put("p1", "key", "v01"), _put("p2", "key", "v02")))
    out = a.apply(_entry(2, {"id": "d1", "op": "del", "k": "key", "ver": 1, "node": "n1"},
                         {"id": "d2", "op": "del", "k": "key", "ver": 1, "node": "n1"},
                         {"id": "d3", "op": "del", "k": "nope", "ver": None, "node": "n1"},
                         _put("p3", "ab", "v01")))
    assert out[0] == ("d1", Outcome(1))
    assert out[1][1].version == -1 and "no version 1" in out[1][1].reason
    assert out[2][1].version == -1 and "unknown" in out[2][1].reason
    assert out[3][1].version == -1 and "at least 3" in out[3][1].reason


def test_applier_tracks_membership_and_round_trips_through_a_snapshot():
    a = Applier()
    a.apply(Entry(1, 1, CONF, {"op": "bootstrap", "voters": [["a", "h:1"]]}))
    a.apply(Entry(2, 2, NOOP, None))
    a.apply(Entry(2, 3, CONF, {"op": "add_learner", "node": "b", "addr": "h:2"}))
    a.apply(_entry(4, _put("c:req-00001", "key", "val"), term=2))
    assert a.conf == ConfState(frozenset({"a"}), frozenset({"b"}), (("a", "h:1"), ("b", "h:2")))
    a.apply(Entry(2, 5, CONF, {"op": "promote", "node": "b", "addr": ""}))
    assert a.conf.voters == {"a", "b"} and not a.conf.learners
    meta, keys = a.export()
    b = Applier()
    b.load(keys, meta)
    assert (b.index, b.term, b.changes, b.conf) == (5, 2, 1, a.conf)
    assert b.outcome_of("c:req-00001") == Outcome(1)
    assert b.store.get("key").value == "val"
    assert membership.apply(b.conf, {"op": "remove", "node": "a"}).voters == {"b"}
    assert conf_from_json(conf_to_json(a.conf)) == a.conf


def test_waiters_a_retry_joins_the_first_attempt_and_settled_outcomes_answer_later_retries():
    async def main():
        w = Waiters()
        f1, new1 = w.register({"id": "c:abc"}, 0.0, 10)
        f2, new2 = w.register({"id": "c:abc"}, 0.5, 10)
        assert (new1, new2) == (True, False)
        w.trigger("c:abc", Outcome(4))
        f3, new3 = w.register({"id": "c:abc"}, 1.0, 10)
        return f1.result(), f2.result(), f3.result(), new3

    r1, r2, r3, new3 = asyncio.run(main())
    assert r1 == r2 == r3 == Outcome(4) and new3 is False


def test_waiters_unsettled_failures_are_never_given_to_a_retry():
    async def main():
        w = Waiters()
        f1, _ = w.register({"id": "c:abc"}, 0.0, 1.0)
        assert w.expire(0.5, Outcome(-1, "late")) == 0
        assert w.expire(1.0, Outcome(-1, "late")) == 1
        f2, new = w.register({"id": "c:abc"}, 2.0, 1.0)
        return f1.result(), f2.done(), new

    r1, done2, new = asyncio.run(main())
    assert r1.version == -1 and not r1.settled
    assert not done2 and new   # the retry is proposed again, not answered with the failure


def test_waiters_due_for_reproposal():
    async def main():
        w = Waiters()
        w.register({"id": "a"}, 0.0, 10)
        w.register({"id": "b"}, 0.0, 10)
        for x in w:
            if x.item["id"] == "a":
                x.proposed_at = 5.0
        return sorted(x.item["id"] for x in w.due(6.0, 2.0))

    assert asyncio.run(main()) == ["b"]


def _bare_node(cid="c1"):
    """Just the parts of a Node that session reads use (no loop running, no I/O)."""
    from types import SimpleNamespace

    from server.node import Node
    n = Node.__new__(Node)
    n.node, n.cid, n.applier, n._apply_waits = "n1", cid, Applier(), []
    n.cfg = SimpleNamespace(read_wait=0.05)
    return n


def test_a_session_position_names_the_cluster_and_what_was_applied():
    n = _bare_node()
    n.applier.apply(_entry(1, _put("x1", "key", "v01")))
    assert n.session_position() == "c1/1"
    assert _bare_node(cid="").session_position() == ""  # not in a cluster yet: none


def test_a_session_read_waits_for_its_position_then_says_why_and_forgets_the_wait():
    n = _bare_node()
    n.applier.apply(_entry(1, _put("x1", "key", "v01")))

    async def run():
        n._loop = asyncio.get_running_loop()
        assert await n.caught_up("c1", 1) is None         # applied already
        assert await n.caught_up("other", 99) is None     # another cluster's position
        reason = await n.caught_up("c1", 10**17)          # never reached here
        assert "has applied up to 1, not yet position 100000000000000000" in reason
        assert n._apply_waits == []                       # nothing left behind
    asyncio.run(run())


def test_a_read_waiting_for_the_node_to_get_in_step_is_woken_by_the_change():
    n = _bare_node()
    n._readable, n._readable_set = False, asyncio.Event()

    def in_step():  # what _update_state does when the state becomes readable
        n._readable = True
        n._readable_set.set()

    async def run():
        assert await n.wait_readable(0.05) is False       # nothing changed: gives up
        asyncio.get_running_loop().call_later(0.05, in_step)
        # woken by the change, long before its own 60 s (a missed wake-up fails here)
        assert await asyncio.wait_for(n.wait_readable(60), 10) is True
    asyncio.run(run())
