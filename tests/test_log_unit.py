"""Pure units of the replicated log's bookkeeping: request ids and taking over.

No broker, no threads: a ReplicatedLog whose transport, peers and result
delivery are fakes, driven by calling its core-thread methods directly.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from server import codec
from server.log import LogConfig, Outcome, ReplicatedLog, Role, _Member
from server.transport import BrokerConfig


class _Result:
    def __init__(self):
        self.outcome: Outcome | None = None


class _Completions:
    """Resolves at once, on the calling thread."""

    def new(self):
        return _Result()

    def deliver(self, pairs):
        for result, outcome in pairs:
            result.outcome = outcome


class _Transport:
    connected = True

    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.published.append((topic, payload))
        return SimpleNamespace(wait_for_publish=lambda timeout=None: None)

    def subscribe(self, topic):
        pass


class _Peers:
    """Status answers by address; an Exception value is raised (a peer that does not answer)."""

    def __init__(self, answers):
        self.answers = answers

    def status(self, addr, timeout=1.0):
        answer = self.answers[addr]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self):
        pass


def _log(node="n1", peers=None) -> ReplicatedLog:
    rlog = ReplicatedLog(LogConfig(node_id=node, address="127.0.0.1:1"), BrokerConfig(),
                         _Completions(), peers=peers)
    rlog.transport = _Transport()
    return rlog


def _batch_from(leader: str, rlog: ReplicatedLog, items: list[dict]):
    return codec.decode_batch(codec.batch_doc(1, leader, rlog.applied + 1, rlog.hash,
                                              time.time(), items))


# ---------------------------------------------------------------------------
# request ids
# ---------------------------------------------------------------------------
def test_a_retry_while_the_first_attempt_waits_shares_its_proposal():
    rlog = _log()
    first = rlog.submit_put("key", "value", "req-0001")
    retry = rlog.submit_put("key", "value", "req-0001")
    assert [it["id"] for it in rlog._outbox] == ["c:req-0001"]   # proposed once
    # another server's proposal of the same request was sequenced first: it still
    # answers both attempts here
    b = _batch_from("n2", rlog, [{"id": "c:req-0001", "op": "put", "k": "key", "v": "value",
                                  "node": "n2"}])
    rlog._resolve_mine(rlog._apply_batch(b, persist=False))
    assert first.outcome == retry.outcome == Outcome(1)


def test_a_retry_after_the_outcome_settled_is_answered_without_a_proposal():
    rlog = _log()
    rlog.submit_del("key", None, "req-0002")
    b = _batch_from("n2", rlog, [rlog._outbox.pop()])
    rlog._resolve_mine(rlog._apply_batch(b, persist=False))
    late = rlog.submit_del("key", None, "req-0002")
    assert late.outcome.version == -1 and "unknown" in late.outcome.reason
    assert rlog._outbox == []


def test_an_unsettled_failure_is_not_given_to_a_retry():
    rlog = _log()
    first = rlog.submit_put("key", "value", "req-0003")
    rlog._resolve_mine([("c:req-0003", Outcome(-1, "lost the broker", settled=False))])
    assert first.outcome.version == -1
    retry = rlog.submit_put("key", "value", "req-0003")
    assert retry.outcome is None                       # waits for the real outcome
    assert [it["id"] for it in rlog._outbox] == ["c:req-0003", "c:req-0003"]


def test_changes_without_request_id_get_distinct_ids():
    rlog = _log()
    rlog.submit_put("key", "value")
    rlog.submit_put("key", "value")
    ids = [it["id"] for it in rlog._outbox]
    assert len(set(ids)) == 2 and not any(i.startswith("c:") for i in ids)


# ---------------------------------------------------------------------------
# taking over
# ---------------------------------------------------------------------------
def _with_live_peers(rlog, *names):
    now = time.monotonic()
    for n in names:
        rlog.members[n] = _Member(n, f"addr-{n}", online=True, seen=now)


def test_no_take_over_while_a_live_peer_does_not_answer():
    peers = _Peers({"addr-n2": SimpleNamespace(epoch=0, applied_seq=0),
                    "addr-n3": TimeoutError("deadline exceeded")})
    rlog = _log(peers=peers)
    _with_live_peers(rlog, "n2", "n3")
    rlog._become_leader()
    assert rlog.role is Role.FOLLOWER
    assert not [t for t, _ in rlog.transport.published if t == rlog.t_log]

    peers.answers["addr-n3"] = SimpleNamespace(epoch=0, applied_seq=0)
    rlog._become_leader()
    assert rlog.role is Role.LEADER and rlog.epoch == 1
    assert [t for t, _ in rlog.transport.published].count(rlog.t_log) == 1  # the epoch batch
