"""The Raft core (server/raft/machine.py) driven by hand: machines exchange
messages through a tiny in-test network that plays the driver (persist,
send, apply, advance).  Pure and fast: no sockets, no clock."""
from __future__ import annotations

import random
from collections import deque

import pytest

from server.raft.machine import Machine
from server.raft.types import (CONF, NORMAL, Config, Entry, HardState, Message, MsgType,
                               ReadState, Role, SnapshotMeta)

ADDRS = {n: f"{n}-host:1" for n in "abcde"}


class Disk:
    """What a driver keeps for one node: hard state, snapshot, log, store."""

    def __init__(self):
        self.hs = HardState()
        self.snap = SnapshotMeta()
        self.log: list[Entry] = []
        self.store: dict[int, object] = {}   # index -> data of applied NORMAL entries

    def write(self, rd) -> None:
        if rd.hard_state:
            self.hs = rd.hard_state
        if rd.entries:
            first = rd.entries[0].index
            self.log = [e for e in self.log if e.index < first] + list(rd.entries)


class Net:
    def __init__(self, names, *, seed=1, bootstrap=True, **cfg):
        self.cfg = cfg
        self.seed = seed
        self.m: dict[str, Machine] = {}
        self.disk: dict[str, Disk] = {}
        self.reads: dict[str, list[ReadState]] = {}
        self.cut: set[str] = set()            # isolated nodes
        self.queue: deque[Message] = deque()
        self.chosen: dict[int, Entry] = {}    # index -> the entry applied there (by anyone)
        for n in names:
            self.add(n)
            if bootstrap:
                self.m[n].bootstrap({v: ADDRS[v] for v in names})

    def add(self, n: str, machine: Machine | None = None) -> Machine:
        self.m[n] = machine or Machine(Config(node=n, **self.cfg), random.Random(f"{self.seed}:{n}"))
        self.disk.setdefault(n, Disk())
        self.reads.setdefault(n, [])
        return self.m[n]

    def process(self, n: str) -> None:
        m, disk = self.m[n], self.disk[n]
        while m.has_ready():
            rd = m.ready()
            disk.write(rd)
            self.queue.extend(rd.messages)
            for e in rd.committed:
                assert self.chosen.setdefault(e.index, e) == e, f"{n} applied a different {e}"
                if e.kind == NORMAL:
                    disk.store[e.index] = e.data
            self.reads[n].extend(rd.read_states)
            if rd.fetch_snapshot:
                self.install(n, rd.fetch_snapshot.frm)
            m.advance(rd)

    def install(self, n: str, src: str) -> None:
        """State transfer: copy src's applied store, then restore."""
        s = self.m[src]
        meta = s.snapshot_meta
        self.disk[n].store = {i: d for i, d in self.disk[src].store.items() if i <= meta.index}
        self.disk[n].snap = meta
        self.m[n].restore(meta)

    def blocked(self, msg: Message) -> bool:
        return msg.frm in self.cut or msg.to in self.cut or msg.to not in self.m

    def settle(self, limit=100_000) -> None:
        for _ in range(limit):
            for n in self.m:
                self.process(n)
            if not self.queue:
                return
            while self.queue:
                msg = self.queue.popleft()
                if not self.blocked(msg):
                    self.m[msg.to].step(msg)
        raise AssertionError("network did not settle")

    def tick(self, times=1, only=None) -> None:
        for _ in range(times):
            for n in only or list(self.m):
                self.m[n].tick()
            self.settle()

    def leaders(self) -> list[str]:
        return [n for n, m in self.m.items() if m.role == Role.LEADER]

    def elect(self, max_ticks=200) -> str:
        for _ in range(max_ticks):
            self.tick()
            live = [n for n in self.leaders() if n not in self.cut]
            if live:
                return live[0]
        raise AssertionError("no leader")

    def propose(self, n: str, data) -> None:
        assert self.m[n].propose(data, 8)
        self.settle()


def applied_data(disk: Disk) -> list:
    return [disk.store[i] for i in sorted(disk.store)]


# ---------------------------------------------------------------------------
def test_single_node_bootstrap_elects_itself_and_commits():
    net = Net("a")
    m = net.m["a"]
    assert m.conf.voters == {"a"} and m.commit == 1 and m.term == 1
    assert net.elect(max_ticks=1) == "a"
    net.propose("a", "x")
    assert applied_data(net.disk["a"]) == ["x"]
    assert m.commit == m.applied == m.last_index == 3   # conf, noop, x
    assert net.disk["a"].hs.commit == 3


def test_leader_counts_own_copy_only_after_advance():
    net = Net("a")
    net.elect()
    m = net.m["a"]
    m.propose("x", 1)
    rd = m.ready()
    assert [e.data for e in rd.entries] == ["x"]
    assert m.commit == rd.entries[0].index - 1
    m.advance(rd)
    assert m.commit == rd.entries[0].index


def test_leader_own_copy_not_counted_in_three_nodes():
    net = Net("abc")
    lead = net.elect()
    f1, f2 = [n for n in "abc" if n != lead]
    L = net.m[lead]
    L.propose("x", 1)
    rd = L.ready()
    idx = rd.entries[-1].index
    # f1 persists and acks; the leader has not persisted its own copy yet.
    for msg in rd.messages:
        if msg.to == f1:
            net.m[f1].step(msg)
    frd = net.m[f1].ready()
    assert [e.index for e in frd.entries] == [idx]      # ack travels with the entries
    net.m[f1].advance(frd)
    for msg in frd.messages:
        L.step(msg)
    assert L.commit < idx
    L.advance(rd)
    assert L.commit == idx


def test_three_nodes_elect_exactly_one_leader():
    for seed in range(5):
        net = Net("abc", seed=seed)
        lead = net.elect()
        net.tick(30)
        assert net.leaders() == [lead]
        assert {m.leader for m in net.m.values()} == {lead}
        assert len({m.term for m in net.m.values()}) == 1
        net.propose(lead, "v")
        assert all(applied_data(d) == ["v"] for d in net.disk.values())


def test_no_commit_without_a_majority():
    net = Net("abc")
    lead = net.elect()
    L = net.m[lead]
    before = L.commit
    net.cut = {n for n in "abc" if n != lead}
    assert L.propose("lost?", 1)
    net.tick(3, only=[lead])
    assert L.commit == before and applied_data(net.disk[lead]) == []
    net.cut = {sorted(net.cut)[0]}    # one follower back: a majority again
    net.tick(3, only=[lead])
    assert L.commit == L.last_index and applied_data(net.disk[lead]) == ["lost?"]


def test_follower_truncates_conflicting_uncommitted_entries():
    boot = Entry(1, 1, CONF, {"op": "bootstrap", "voters": [["a", ""], ["b", ""], ["c", ""]]})
    old = [boot, Entry(1, 2, NORMAL, "old2"), Entry(1, 3, NORMAL, "old3")]
    a = Machine(Config(node="a"), random.Random(1), hard_state=HardState(1, "", 1), entries=old)
    a.advance(a.ready())
    a.step(Message(MsgType.APP, "b", "a", term=2, index=1, log_term=1,
                   entries=(Entry(2, 2, NORMAL, "new2"),), commit=1))
    rd = a.ready()
    assert [(e.index, e.term) for e in rd.entries] == [(2, 2)]
    assert a.last_index == 2 and a.term_at(2) == 2
    assert [(m.type, m.index, m.reject) for m in rd.messages] == [(MsgType.APP_RESP, 2, False)]
    # A mismatching APP is rejected with a hint.
    a.advance(rd)
    a.step(Message(MsgType.APP, "b", "a", term=2, index=5, log_term=2, commit=1))
    (resp,) = a.ready().messages
    assert resp.reject and resp.index == 5 and resp.hint == 2


def test_prevote_rejoining_node_does_not_depose_leader():
    net = Net("abc")
    lead = net.elect()
    term = net.m[lead].term
    other = next(n for n in "abc" if n != lead)
    net.cut = {other}
    net.tick(60)
    assert net.m[other].term == term            # pre-vote failed, term not bumped
    assert net.m[other].role in (Role.FOLLOWER, Role.PRE_CANDIDATE)
    net.cut = set()
    net.tick(30)
    assert net.leaders() == [lead] and net.m[lead].term == term


def test_without_prevote_isolated_node_bumps_term():
    # Control for the test above: it can fail.
    net = Net("abc", pre_vote=False)
    lead = net.elect()
    other = next(n for n in "abc" if n != lead)
    term = net.m[lead].term
    net.cut = {other}
    net.tick(60)
    assert net.m[other].term > term


def test_check_quorum_steps_down_isolated_leader():
    net = Net("abc")
    lead = net.elect()
    L = net.m[lead]
    assert L.quorum_active()
    net.cut = {lead}
    net.tick(L.cfg.election_tick * 2 + 1, only=[lead])
    assert L.role != Role.LEADER and not L.quorum_active()
    L.read_index("after")
    net.settle()
    assert net.reads[lead][-1] == ReadState("after", 0)


def test_vote_persisted_in_the_ready_that_grants_it():
    net = Net("abc")
    a = net.m["a"]
    net.settle()
    a.step(Message(MsgType.VOTE, "b", "a", term=2, index=1, log_term=1))
    rd = a.ready()
    assert rd.hard_state == HardState(2, "b", 1)
    assert [(m.type, m.to, m.reject) for m in rd.messages] == [(MsgType.VOTE_RESP, "b", False)]
    a.advance(rd)
    a.step(Message(MsgType.VOTE, "c", "a", term=2, index=1, log_term=1))
    rd = a.ready()
    assert rd.hard_state is None and rd.messages[0].reject
    # A candidate with a shorter log is refused.
    a.step(Message(MsgType.VOTE, "c", "a", term=3, index=0, log_term=0))
    assert a.ready().messages[0].reject


def test_add_learner_catches_up_and_is_promoted():
    net = Net("abc")
    lead = net.elect()
    for i in range(5):
        net.propose(lead, f"v{i}")
    net.add("d")
    assert net.m["d"].propose("x") is False               # not a member yet
    L = net.m[lead]
    assert L.propose_conf("add_learner", "d", ADDRS["d"]) is None
    net.settle()
    net.tick(5)
    for m in net.m.values():
        assert m.conf.voters == {"a", "b", "c", "d"} and not m.conf.learners, m.node
        assert m.conf.addr("d") == ADDRS["d"]
    assert applied_data(net.disk["d"]) == [f"v{i}" for i in range(5)]
    assert set(L.progress()) == {"a", "b", "c", "d"}


def test_learner_not_promoted_when_disabled():
    net = Net("abc", auto_promote=False)
    lead = net.elect()
    net.add("d")
    assert net.m[lead].propose_conf("add_learner", "d", ADDRS["d"]) is None
    net.tick(5)
    assert net.m[lead].conf.learners == {"d"} and "d" not in net.m[lead].conf.voters
    assert net.m["d"].commit == net.m[lead].commit


def test_remove_leader_then_follower():
    net = Net("abc")
    lead = net.elect()
    L = net.m[lead]
    # The leader removes itself from three voters: it steps down once that is applied,
    # and the other two (still a quorum) elect a leader.
    assert L.propose_conf("remove", lead) is None
    net.settle()
    assert L.role == Role.FOLLOWER
    for _ in range(200):   # bounded: election timeouts are randomised
        net.tick(1)
        if net.leaders():
            break
    rest = set("abc") - {lead}
    [n] = net.leaders()
    assert n in rest
    N = net.m[n]
    assert N.conf.voters == rest and lead not in N.progress()
    assert N.conf.addr(lead) == ""
    # From two voters a leader may not remove itself (the other could never learn that the
    # removal committed, and would wait for its vote forever: found by the simulator).
    assert N.propose_conf("remove", n) == "the leader cannot remove itself from two voters"
    gone = (rest - {n}).pop()
    assert N.propose_conf("remove", gone) is None
    net.settle()
    assert N.conf.voters == {n}
    net.cut = {gone, lead}
    net.propose(n, "one of one")
    assert applied_data(net.disk[n]) == ["one of one"]
    assert N.propose_conf("remove", n) == "would remove the last voter"


def test_one_conf_change_at_a_time():
    net = Net("abc")
    lead = net.elect()
    net.add("d")
    net.add("e")
    L = net.m[lead]
    follower = next(n for n in "abc" if n != lead)
    assert net.m[follower].propose_conf("remove", "c") == "not the leader"
    assert L.propose_conf("add_learner", "a") == "already a member"
    assert L.propose_conf("remove", "zz") == "not a member"
    assert L.propose_conf("add_learner", "d", ADDRS["d"]) is None
    assert L.pending_conf()
    assert L.propose_conf("add_learner", "e", ADDRS["e"]) == "a membership change is in progress"
    net.settle()
    assert not L.pending_conf()
    assert L.propose_conf("add_learner", "e", ADDRS["e"]) is None


def test_compaction_then_snapshot_restores_lagging_follower():
    net = Net("abc")
    lead = net.elect()
    L = net.m[lead]
    lag = next(n for n in "abc" if n != lead)
    net.cut = {lag}
    for i in range(20):
        net.propose(lead, i)
    L.compact(L.applied)
    assert L.first_index == L.applied + 1 and L.term_at(1) is None
    assert L.snapshot_meta.conf.voters == set("abc")
    assert L.entries_from(L.first_index, 1 << 20) == [] and L.last_index == L.snapshot_meta.index
    net.cut = set()
    net.tick(5)
    F = net.m[lag]
    assert F.snapshot_meta.index == L.snapshot_meta.index      # it took the snapshot
    assert F.commit == L.commit and applied_data(net.disk[lag]) == list(range(20))
    net.propose(lead, "after")
    assert applied_data(net.disk[lag])[-1] == "after"


def test_read_index_on_leader_and_via_follower():
    net = Net("abc")
    lead = net.elect()
    net.propose(lead, "w")
    L = net.m[lead]
    L.read_index("r1")
    net.settle()
    assert net.reads[lead] == [ReadState("r1", L.commit)]
    follower = next(n for n in "abc" if n != lead)
    net.m[follower].read_index("r2")
    net.settle()
    assert net.reads[follower] == [ReadState("r2", L.commit)]
    # Cut off from both followers: no answer until it steps down, then 0.
    net.cut = set("abc") - {lead}
    L.read_index("r3")
    net.settle()
    assert len(net.reads[lead]) == 1
    net.tick(L.cfg.election_tick * 2 + 1, only=[lead])
    assert net.reads[lead][-1] == ReadState("r3", 0)


def test_read_index_single_node_answers_at_once():
    net = Net("a")
    net.elect()
    net.m["a"].read_index("r")
    net.settle()
    assert net.reads["a"] == [ReadState("r", net.m["a"].commit)]


def test_restart_replays_committed_entries_and_rebuilds_conf():
    net = Net("abc")
    lead = net.elect()
    net.add("d")
    assert net.m[lead].propose_conf("add_learner", "d", ADDRS["d"]) is None
    net.tick(5)
    for i in range(3):
        net.propose(lead, i)
    victim = next(n for n in "abc" if n != lead)
    old = net.m[victim]
    # Compact part of the log, as a driver taking a snapshot would.
    old.compact(3)
    disk = net.disk[victim]
    snap = old.snapshot_meta
    entries = [e for e in disk.log if e.index > snap.index]
    m = Machine(Config(node=victim), random.Random(7), hard_state=disk.hs,
                snapshot=snap, entries=entries)
    assert m.conf.voters == set("abcd") and m.conf.addr("d") == ADDRS["d"]
    assert m.applied == snap.index and m.commit == old.commit and m.term == old.term
    rd = m.ready()
    assert [e.index for e in rd.committed] == list(range(snap.index + 1, old.commit + 1))
    assert [e.data for e in rd.committed if e.kind == NORMAL] == [0, 1, 2]
    assert not rd.entries and rd.hard_state is None
    m.advance(rd)
    assert m.conf.voters == set("abcd")
    # It rejoins the cluster and keeps up.
    net.add(victim, m)
    net.propose(lead, "after restart")
    assert net.m[victim].commit == net.m[lead].commit


def test_forwarded_proposals_are_batched_into_one_app():
    net = Net("abc")
    lead = net.elect()
    f = next(n for n in "abc" if n != lead)
    F = net.m[f]
    for i in range(5):
        assert F.propose(i, 4)
    rd = F.ready()
    props = [m for m in rd.messages if m.type == MsgType.PROP]
    assert len(props) == 1 and len(props[0].entries) == 5 and props[0].to == lead
    F.advance(rd)
    L = net.m[lead]
    L.step(props[0])
    apps = [m for m in L.ready().messages if m.type == MsgType.APP and len(m.entries) == 5]
    assert len(apps) == 2


def test_messages_to_others_and_stale_terms_are_ignored():
    net = Net("abc")
    lead = net.elect()
    L = net.m[lead]
    term, commit = L.term, L.commit
    L.step(Message(MsgType.APP, "b", "zz", term=term + 5))
    L.step(Message(MsgType.APP_RESP, "unknown", lead, term=term, index=99))
    L.step(Message(MsgType.HB_RESP, "unknown", lead, term=term))
    assert L.term == term and L.role == Role.LEADER and L.commit == commit


@pytest.mark.parametrize("seed", range(12))
def test_random_faults_keep_logs_consistent(seed):
    """Drops, duplicates, reordering and partitions: committed prefixes agree."""
    rng = random.Random(seed)
    net = Net("abcde", seed=seed)
    net.elect()
    for step in range(300):
        if rng.random() < 0.05:
            net.cut = set(rng.sample("abcde", rng.choice([0, 1, 2])))
        for n in net.m:
            if rng.random() < 0.5:
                net.m[n].tick()
        lead = [n for n in net.leaders() if n not in net.cut]
        if lead and rng.random() < 0.5:
            net.m[lead[0]].propose(step, 4)
        for n in net.m:
            net.process(n)
        msgs = list(net.queue)
        net.queue.clear()
        rng.shuffle(msgs)
        for msg in msgs:
            if net.blocked(msg) or rng.random() < 0.1:
                continue
            for _ in range(2 if rng.random() < 0.05 else 1):
                net.m[msg.to].step(msg)
    net.cut = set()
    net.tick(60)
    stores = [applied_data(d) for d in net.disk.values()]
    assert stores[0] and all(s == stores[0] for s in stores), stores
    assert len(set(net.leaders())) == 1
