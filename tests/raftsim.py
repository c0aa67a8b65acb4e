"""Deterministic simulation of the Raft core over a hostile network.

As FoundationDB and TigerBeetle test themselves: machines from
``server/raft/machine.py``, a simulated driver (persist -> send -> apply ->
advance, with crashes between the steps), simulated disks and stores, and a
network that loses, duplicates, delays and reorders messages, partitions and
freezes nodes.  One ``random.Random(seed)`` decides everything, so a failing
seed replays exactly.  Invariants are checked after every event; a final
heal-and-settle phase checks durability and liveness.
"""
from __future__ import annotations

import collections
import random
import traceback
from dataclasses import dataclass, replace

from server.raft.machine import Machine
from server.raft.types import (NORMAL, Config, Entry, HardState, Message, Role,
                               SnapshotMeta)

REPLAY = "KVS_SIM_SEED={seed} .venv/bin/python -m pytest tests/test_raft_sim.py -k replay"
KEYS = ("ka", "kb", "kc", "kd", "ke")
NAMES = tuple(f"n{i}" for i in range(1, 10))
MAX_QUEUED = 400          # in-flight bound; beyond it the oldest is dropped (Mosquitto's max_queued)
SETTLE_EVENTS = 30_000    # liveness bound of the settle phase


class SimFailure(AssertionError):
    pass


class Invariant(AssertionError):
    """An invariant broke; run() turns it into a SimFailure with seed and trace."""


# ---------------------------------------------------------------------------
# simulated store and disk
# ---------------------------------------------------------------------------
class Store:
    """The replicated state: a put of a key gets version = puts of that key so
    far (as server/store.py); change ids make applying a retried change a no-op."""
    __slots__ = ("applied", "counts", "ids")

    def __init__(self, applied: int = 0, counts: dict | None = None, ids: dict | None = None):
        self.applied = applied
        self.counts = counts if counts is not None else {}
        self.ids = ids if ids is not None else {}   # change id -> (key, version)

    def copy(self) -> "Store":
        return Store(self.applied, dict(self.counts), dict(self.ids))

    def apply(self, data: dict) -> None:
        for it in data["items"]:
            cid = it["id"]
            if cid not in self.ids:
                k = it["key"]
                v = self.counts.get(k, 0) + 1
                self.counts[k] = v
                self.ids[cid] = (k, v)


class Disk:
    """What the driver has fsynced: hard state, snapshot (meta + store image), log."""
    __slots__ = ("hard_state", "snap", "snap_store", "entries")

    def __init__(self):
        self.hard_state = HardState()
        self.snap = SnapshotMeta()
        self.snap_store: Store | None = None
        self.entries: list[Entry] = []      # contiguous, after snap.index

    def last_index(self) -> int:
        return self.snap.index + len(self.entries)

    def term_at(self, i: int) -> int | None:
        if i == self.snap.index:
            return self.snap.term
        if self.snap.index < i <= self.snap.index + len(self.entries):
            return self.entries[i - self.snap.index - 1].term
        return None


class SimNode:
    __slots__ = ("name", "cfg", "disk", "m", "store", "frozen", "fetch", "reads",
                 "last_term", "last_commit")

    def __init__(self, name: str, cfg: Config):
        self.name = name
        self.cfg = cfg
        self.disk = Disk()
        self.m = None                 # the Machine; None while crashed
        self.store: Store | None = None
        self.frozen = False
        self.fetch = None             # pending FetchSnapshot
        self.reads: list = []         # (index, ctx, acked-before count) waiting for apply
        self.last_term = 0
        self.last_commit = 0


# ---------------------------------------------------------------------------
# schedule parameters
# ---------------------------------------------------------------------------
@dataclass
class Params:
    voters: int = 3               # bootstrapped voters
    spare: int = 0                # fresh nodes added as learners by conf events
    events: int = 400
    election_tick: int = 10
    max_inflight: int = 256
    max_msg_bytes: int = 1 << 20
    loss: float = 0.0
    dup: float = 0.0
    fifo: float = 1.0             # chance a delivery keeps one publisher's order
    sync: float = 1.0             # chance a Ready is handled right after the event
    mid_crash: float = 0.0        # chance of a crash between two steps of handling a Ready
    forget_vote: bool = False     # broken driver (self-test): does not persist the vote
    pre_vote: bool = True
    check_quorum: bool = True
    w_deliver: float = 12.0
    w_tick: float = 1.0
    w_tick_one: float = 0.2
    w_ready: float = 3.0
    w_propose: float = 0.8
    w_retry: float = 0.1
    w_read: float = 0.2
    w_crash: float = 0.03
    w_restart: float = 0.2
    w_partition: float = 0.03
    w_heal: float = 0.08
    w_freeze: float = 0.02
    w_resume: float = 0.15
    w_conf: float = 0.03
    w_compact: float = 0.05
    w_fetch: float = 1.0


def random_params(rng: random.Random) -> Params:
    shape = rng.random()
    if shape < 0.4:
        p = Params(voters=3, spare=rng.choice((0, 0, 1, 2)))
    elif shape < 0.75:
        p = Params(voters=5, spare=rng.choice((0, 1)))
    else:                          # one voter; the rest join as learners and get promoted
        p = Params(voters=1, spare=rng.choice((2, 4)), w_conf=0.3)
    p.events = rng.choice((200, 300, 400, 600, 800, 2000))
    p.election_tick = rng.choice((4, 6, 10))
    p.max_inflight = rng.choice((1, 4, 256))
    p.max_msg_bytes = rng.choice((100, 400, 1 << 20))
    p.loss = rng.choice((0.0, 0.02, 0.1, 0.25))
    p.dup = rng.choice((0.0, 0.05, 0.2))
    p.fifo = rng.choice((1.0, 0.95, 0.7))
    p.sync = rng.choice((1.0, 0.8, 0.3))
    p.mid_crash = rng.choice((0.0, 0.0, 0.002, 0.01))
    for name in ("w_crash", "w_partition", "w_freeze", "w_compact", "w_read", "w_propose"):
        setattr(p, name, getattr(p, name) * rng.choice((0.0, 0.5, 1.0, 2.0)))
    return p


def _fmt_msg(m: Message) -> str:
    s = f"{m.type.value} {m.frm}->{m.to} t{m.term}"
    if m.index or m.log_term:
        s += f" i{m.index}/lt{m.log_term}"
    if m.entries:
        s += f" +{len(m.entries)}e({m.entries[0].index}..{m.entries[-1].index})"
    if m.commit:
        s += f" c{m.commit}"
    if m.reject:
        s += f" REJ(hint {m.hint})"
    if m.ctx:
        s += f" ctx={m.ctx}"
    return s


# ---------------------------------------------------------------------------
# the simulator
# ---------------------------------------------------------------------------
class Sim:
    def __init__(self, seed: int, params: Params | None = None, machine_cls=Machine,
                 **overrides):
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = params if params is not None else random_params(self.rng)
        for k, v in overrides.items():
            if not hasattr(self.p, k):
                raise TypeError(f"unknown schedule parameter {k}")
            setattr(self.p, k, v)
        self.machine_cls = machine_cls
        self.nodes: dict[str, SimNode] = {}
        self.inflight: list[Message] = []
        self.blocked: set[tuple[str, str]] = set()     # (from, to) links that drop everything
        self.trace: collections.deque = collections.deque(maxlen=40)
        self.now = 0                                   # event counter
        # global knowledge for the checkers
        self.leaders: dict[int, str] = {}              # term -> the one leader
        self.applied_at: dict[int, Entry] = {}         # index -> entry applied there (anywhere)
        self.max_applied = 0
        self.entry_at: dict[tuple[int, int], tuple] = {}   # (index, term) -> (prev term, kind, data)
        self.changes: dict[str, dict] = {}             # change id -> data
        self.proposers: dict[str, set] = {}            # unacked change id -> nodes it was proposed at
        self.acked: dict[str, tuple] = {}              # change id -> (key, version) acknowledged
        self.ack_order: list[str] = []
        self.read_issued: dict[str, tuple] = {}        # ctx -> (node, acked count at issue)
        self.stats = collections.Counter()
        names = NAMES[: self.p.voters + self.p.spare]
        voters = {n: f"addr-{n}" for n in names[: self.p.voters]}
        for name in names:
            node = self._new_node(name)
            if name in voters:
                node.m.bootstrap(voters)
                self.drain(node)        # the driver persists the bootstrap before serving
        self.spare = [n for n in NAMES if n not in self.nodes]

    # ---- plumbing ----
    def _new_node(self, name: str) -> SimNode:
        p = self.p
        cfg = Config(node=name, election_tick=p.election_tick, max_inflight=p.max_inflight,
                     max_msg_bytes=p.max_msg_bytes, pre_vote=p.pre_vote,
                     check_quorum=p.check_quorum)
        node = SimNode(name, cfg)
        node.m = self.machine_cls(cfg, random.Random(self.rng.getrandbits(32)))
        node.store = Store()
        self.nodes[name] = node
        return node

    def log(self, *what) -> None:
        self.trace.append((self.now, what))

    def fail(self, why: str):
        raise Invariant(why)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.m is not None]

    def running(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.m is not None and not n.frozen]

    def leader(self) -> SimNode | None:
        """The live leader of the highest term (None if there is none)."""
        best = None
        for n in self.running():
            if n.m.role == Role.LEADER and (best is None or n.m.term > best.m.term):
                best = n
        return best

    # ---- the driver: handle one Ready ----
    def handle_ready(self, node: SimNode) -> None:
        m, rng, p = node.m, self.rng, self.p
        rd = m.ready()
        self._persist(node, rd)
        if p.mid_crash and rng.random() < p.mid_crash:
            return self.crash(node, "after persist")
        if rd.messages:
            for msg in sorted(rd.messages, key=_to):   # machine-internal set order must not matter
                self._send(node, msg)
            if p.mid_crash and rng.random() < p.mid_crash:
                return self.crash(node, "after send")
        for e in rd.committed:
            self._apply(node, e)
        for rs in rd.read_states:
            self._read_state(node, rs)
        if rd.fetch_snapshot is not None:
            node.fetch = rd.fetch_snapshot
            self.log("fetch?", node.name, rd.fetch_snapshot)
        m.advance(rd)

    def drain(self, node: SimNode) -> None:
        for _ in range(20):
            if node.m is None or node.frozen or not node.m.has_ready():
                return
            self.handle_ready(node)

    def _after(self, node: SimNode) -> None:
        if self.p.sync >= 1.0 or self.rng.random() < self.p.sync:
            self.drain(node)

    def _persist(self, node: SimNode, rd) -> None:
        d = node.disk
        if rd.entries:
            first = rd.entries[0].index
            if first <= d.snap.index:
                self.fail(f"{node.name} persists entry {first} <= its snapshot {d.snap.index}")
            if first > d.last_index() + 1:
                self.fail(f"{node.name} persists entry {first} after a gap (disk last {d.last_index()})")
            cut = first - d.snap.index - 1
            commit = max(d.hard_state.commit, d.snap.index)
            for old in d.entries[cut: commit - d.snap.index]:
                new = rd.entries[old.index - first] if old.index - first < len(rd.entries) else None
                if new is None or new != old:
                    self.fail(f"{node.name} overwrites committed entry {old.index} "
                              f"(commit {commit}) with {new}")
            del d.entries[cut:]
            for e in rd.entries:
                if e.index != d.last_index() + 1:
                    self.fail(f"{node.name}: Ready.entries not contiguous at {e.index}")
                prev = d.term_at(e.index - 1)
                d.entries.append(e)
                key = (e.index, e.term)
                seen = self.entry_at.get(key)
                mine = (prev, e.kind, e.data)
                if seen is None:
                    self.entry_at[key] = mine
                elif seen != mine:
                    self.fail(f"log matching: {node.name} has {e} after term {prev}, "
                              f"another log has {seen} at the same (index, term)")
        hs = rd.hard_state
        if hs is not None:
            old = d.hard_state
            if hs.term < old.term:
                self.fail(f"{node.name} persists term {hs.term} < {old.term}")
            if hs.term == old.term and old.vote and hs.vote != old.vote:
                self.fail(f"{node.name} votes twice in term {hs.term}: {old.vote} then {hs.vote}")
            if hs.commit < old.commit:
                self.fail(f"{node.name} persists commit {hs.commit} < {old.commit}")
            if self.p.forget_vote:
                hs = replace(hs, vote="")
            d.hard_state = hs
        if d.hard_state.commit > d.last_index():
            self.fail(f"{node.name} persisted commit {d.hard_state.commit} beyond its log "
                      f"{d.last_index()}")

    def _send(self, node: SimNode, msg: Message) -> None:
        if msg.frm != node.name:
            self.fail(f"{node.name} sends a message from {msg.frm}")
        p, rng = self.p, self.rng
        if (msg.frm, msg.to) in self.blocked or (p.loss and rng.random() < p.loss):
            return
        q = self.inflight
        q.append(msg)
        if p.dup and rng.random() < p.dup:
            q.append(msg)
        if len(q) > MAX_QUEUED:
            del q[0]

    def _apply(self, node: SimNode, e: Entry) -> None:
        st = node.store
        if e.index != st.applied + 1:
            self.fail(f"{node.name} applies {e.index} after {st.applied}")
        if node.disk.term_at(e.index) != e.term:
            self.fail(f"{node.name} applies {e} that it has not persisted "
                      f"(disk term {node.disk.term_at(e.index)})")
        g = self.applied_at.get(e.index)
        if g is None:
            self.applied_at[e.index] = e
            self.max_applied = max(self.max_applied, e.index)
        elif g != e:
            self.fail(f"state machine safety: {node.name} applies {e} at {e.index}, "
                      f"another node applied {g}")
        st.applied = e.index
        if e.kind == NORMAL:
            st.apply(e.data)
            for it in e.data["items"]:
                props = self.proposers.get(it["id"])
                if props and node.name in props:
                    self._ack(node, it["id"])
        if node.reads:
            self._serve_reads(node)

    def _ack(self, node: SimNode, cid: str) -> None:
        del self.proposers[cid]
        self.acked[cid] = node.store.ids[cid]
        self.ack_order.append(cid)
        self.log("ack", node.name, cid, self.acked[cid])

    def _read_state(self, node: SimNode, rs) -> None:
        issued = self.read_issued.pop(rs.ctx, None)
        if issued is None:
            return                      # a duplicate answer to a read already answered
        if issued[0] != node.name:
            self.fail(f"read {rs.ctx} issued at {issued[0]} answered at {node.name}")
        self.log("readstate", node.name, rs.ctx, rs.index)
        if rs.index == 0:
            self.stats["reads_failed"] += 1
            return
        node.reads.append((rs.index, rs.ctx, issued[1]))
        self._serve_reads(node)

    def _serve_reads(self, node: SimNode) -> None:
        st = node.store
        keep = []
        for index, ctx, n in node.reads:
            if st.applied < index:
                keep.append((index, ctx, n))
                continue
            self.stats["reads_served"] += 1
            for cid in self.ack_order[:n]:
                if st.ids.get(cid) != self.acked[cid]:
                    self.fail(f"linearizable read {ctx} at {node.name} (index {index}, applied "
                              f"{st.applied}) misses {cid}={self.acked[cid]} acknowledged before it")
        node.reads = keep

    # ---- faults and operations ----
    def crash(self, node: SimNode, why: str = "") -> None:
        self.log("crash", node.name, why)
        self.stats["crashes"] += 1
        node.m = None
        node.store = None
        node.frozen = False
        node.fetch = None
        node.reads = []
        self.inflight = [x for x in self.inflight if x.to != node.name]
        for props in self.proposers.values():
            props.discard(node.name)     # its clients' calls died with it

    def restart(self, node: SimNode) -> None:
        d = node.disk
        node.m = self.machine_cls(node.cfg, random.Random(self.rng.getrandbits(32)),
                                  hard_state=d.hard_state, snapshot=d.snap,
                                  entries=tuple(d.entries))
        node.store = d.snap_store.copy() if d.snap_store is not None else Store()
        node.store.applied = d.snap.index
        node.last_term = node.m.term
        node.last_commit = node.m.commit
        self.log("restart", node.name, d.hard_state, d.snap.index, d.last_index())
        self._after(node)

    def propose(self, node: SimNode, cid: str | None = None) -> bool:
        if cid is None:
            cid = f"c{len(self.changes)}"
            key = self.rng.choice(KEYS)
            self.changes[cid] = {"ts": float(self.now),
                                 "items": [{"id": cid, "key": key, "value": f"v-{cid}"}]}
        data = self.changes[cid]
        ok = node.m.propose(data, size=60)
        self.log("propose", node.name, cid, ok)
        if ok:
            self.proposers.setdefault(cid, set()).add(node.name)
        self._after(node)
        return ok

    def read(self, node: SimNode) -> str:
        ctx = f"r{self.now}-{node.name}"
        self.read_issued[ctx] = (node.name, len(self.ack_order))
        node.m.read_index(ctx)
        self.log("read", node.name, ctx)
        self._after(node)
        return ctx

    def compact(self, node: SimNode) -> None:
        st, d = node.store, node.disk
        idx = st.applied
        if idx <= d.snap.index or idx != node.m.applied:
            return
        node.m.compact(idx)
        meta = node.m.snapshot_meta
        if meta.index != idx or meta.term != d.term_at(idx):
            self.fail(f"{node.name} compact({idx}) gives snapshot meta {meta}")
        del d.entries[: idx - d.snap.index]
        d.snap = meta
        d.snap_store = st.copy()
        self.log("compact", node.name, idx)
        self.stats["compactions"] += 1

    def complete_fetch(self, node: SimNode) -> None:
        fs, node.fetch = node.fetch, None
        src = self.nodes.get(fs.frm)
        ok = (src is not None and src.m is not None and not src.frozen
              and (node.name, fs.frm) not in self.blocked and (fs.frm, node.name) not in self.blocked
              and src.store.applied >= fs.index and src.store.applied > node.store.applied)
        self.log("fetch", node.name, "from", fs.frm, fs.index, "ok" if ok else "failed")
        if not ok:
            return                      # the leader resends SNAP after an election timeout
        st = src.store.copy()
        sm = src.m
        idx = st.applied
        term = sm.term_at(idx)
        if term is None and sm.snapshot_meta.index == idx:
            term = sm.snapshot_meta.term
        meta = SnapshotMeta(index=idx, term=term or 0, conf=sm.conf)
        d = node.disk
        if d.term_at(idx) == meta.term and idx >= d.snap.index:
            del d.entries[: idx - d.snap.index]
        else:
            d.entries = []
        d.snap = meta
        d.snap_store = st.copy()
        node.store = st
        node.m.restore(meta)
        self.stats["snapshots_installed"] += 1
        for cid in [c for c, props in self.proposers.items() if node.name in props and c in st.ids]:
            self._ack(node, cid)
        self._after(node)

    def conf_change(self, leader: SimNode) -> str | None:
        rng, m = self.rng, leader.m
        conf = m.conf
        ops = []
        if self.spare and len(conf.members()) < 7:
            ops.append("add_learner")
        if conf.learners:
            ops.append("promote")
        if len(conf.members()) > 1:
            ops.append("remove")
        if not ops:
            return None
        op = rng.choice(ops)
        if op == "add_learner":
            # a node that is not a member of anything: added here, or fresh from spare
            candidates = [n.name for n in self.live() if not n.m.conf.members()
                          and n.name not in conf.members()]
            name = rng.choice(candidates) if candidates else self.spare[0]
        elif op == "promote":
            name = rng.choice(sorted(conf.learners))
        else:
            name = rng.choice(sorted(conf.members()))
        reason = m.propose_conf(op, name, f"addr-{name}")
        self.log("conf", leader.name, op, name, reason)
        if reason is None:
            self.stats["conf_changes"] += 1
            if name in self.spare:
                self.spare.remove(name)
                self._new_node(name)
        self._after(leader)
        return reason

    def deliver(self, i: int | None = None) -> None:
        q, rng = self.inflight, self.rng
        if i is None:
            i = rng.randrange(len(q))
            msg = q[i]
            if self.p.fifo >= 1.0 or rng.random() < self.p.fifo:
                # the broker keeps one publisher's order to one subscriber
                for j in range(i):
                    if q[j].frm == msg.frm and q[j].to == msg.to:
                        i = j
                        break
        msg = q[i]
        node = self.nodes.get(msg.to)
        if node is not None and node.frozen:
            return                      # stays queued while the process is paused
        del q[i]
        if node is None or node.m is None or (msg.frm, msg.to) in self.blocked:
            return
        self.log("deliver", msg)
        node.m.step(msg)
        self._after(node)

    def tick(self, nodes=None) -> None:
        nodes = self.running() if nodes is None else nodes
        if not nodes:
            return
        for n in nodes:
            n.m.tick()
        self.log("tick", "all" if len(nodes) > 1 else nodes[0].name)
        for n in nodes:
            self._after(n)

    def partition(self) -> None:
        rng = self.rng
        names = [n.name for n in self.live()]
        r = rng.random()
        if len(names) < 2:
            return
        if r < 0.4:                    # symmetric split
            rng.shuffle(names)
            cut = rng.randrange(1, len(names))
            a, b = names[:cut], names[cut:]
            for x in a:
                for y in b:
                    self.blocked.add((x, y))
                    self.blocked.add((y, x))
            self.log("partition", a, b)
        elif r < 0.7:                  # isolate the leader
            ld = self.leader()
            x = ld.name if ld else rng.choice(names)
            for y in self.nodes:
                if y != x:
                    self.blocked.add((x, y))
                    self.blocked.add((y, x))
            self.log("isolate", x)
        else:                          # one-way
            x, y = rng.sample(names, 2)
            self.blocked.add((x, y))
            self.log("one-way", x, y)

    # ---- checkers ----
    def check(self) -> None:
        for n in self.nodes.values():
            m = n.m
            if m is None:
                continue
            t = m.term
            if t < n.last_term:
                self.fail(f"{n.name} term went back {n.last_term} -> {t}")
            n.last_term = t
            c = m.commit
            if c < n.last_commit:
                self.fail(f"{n.name} commit went back {n.last_commit} -> {c}")
            n.last_commit = c
            if m.role == Role.LEADER:
                who = self.leaders.get(t)
                if who is None:
                    self.leaders[t] = n.name
                    self.log("leader", n.name, t)
                    self.stats["leaders"] += 1
                    self._check_complete(n, self.max_applied)
                elif who != n.name:
                    self.fail(f"election safety: {who} and {n.name} both leaders in term {t}")

    def _check_complete(self, n: SimNode, upto: int, lo: int | None = None) -> None:
        """Leader completeness: a leader holds every committed entry of an earlier term."""
        m = n.m
        snap = m.snapshot_meta.index
        for i in range(max(snap + 1, upto if lo is None else lo), upto + 1):
            e = self.applied_at.get(i)
            if e is not None and e.term < m.term and m.term_at(i) != e.term:
                self.fail(f"leader completeness: {n.name} leader of term {m.term} has term "
                          f"{m.term_at(i)} at {i}, committed {e}")

    def check_final(self, leader: SimNode) -> None:
        members = sorted(leader.m.conf.members())
        self._check_complete(leader, self.max_applied, lo=1)
        for name in members:
            n = self.nodes[name]
            for cid, ver in self.acked.items():
                if n.store.ids.get(cid) != ver:
                    self.fail(f"durability: write {cid} acknowledged as {ver} is "
                              f"{n.store.ids.get(cid)} at {name}")
            # the whole log must match the leader's where both still have it
            m = n.m
            for i in range(max(m.first_index, leader.m.first_index), m.last_index + 1):
                if m.term_at(i) != leader.m.term_at(i):
                    self.fail(f"log matching: {name} has term {m.term_at(i)} at {i}, "
                              f"leader {leader.name} {leader.m.term_at(i)}")

    # ---- the schedule ----
    def step_random(self) -> None:
        p, rng = self.p, self.rng
        running = self.running()
        crashed = [n for n in self.nodes.values() if n.m is None]
        frozen = [n for n in self.nodes.values() if n.frozen]
        ready = [n for n in running if n.m.has_ready()]
        fetching = [n for n in running if n.fetch is not None]
        weights = (
            # the broker's throughput grows with its backlog, as a real one far
            # outpaces a 100 ms tick; a fixed rate would saturate the queue
            p.w_deliver * max(1.0, len(self.inflight) / 8) if self.inflight else 0.0,
            p.w_tick if running else 0.0,
            p.w_tick_one if running else 0.0,
            p.w_ready if ready else 0.0,
            p.w_propose if running else 0.0,
            p.w_retry if self.proposers and running else 0.0,
            p.w_read if running else 0.0,
            p.w_crash if running else 0.0,
            p.w_restart if crashed else 0.0,
            p.w_partition,
            p.w_heal if self.blocked else 0.0,
            p.w_freeze if running else 0.0,
            p.w_resume if frozen else 0.0,
            p.w_conf,
            p.w_compact if running else 0.0,
            p.w_fetch if fetching else 0.0,
        )
        ev = rng.choices(_EVENTS, weights)[0]
        if ev == "deliver":
            self.deliver()
        elif ev == "tick":
            self.tick(running)
        elif ev == "tick_one":
            self.tick([rng.choice(running)])
        elif ev == "ready":
            n = rng.choice(ready)
            self.log("ready", n.name)
            self.handle_ready(n)
        elif ev == "propose":
            ld = self.leader()
            n = ld if ld is not None and rng.random() < 0.5 else rng.choice(running)
            self.propose(n)
        elif ev == "retry":
            self.propose(rng.choice(running), rng.choice(sorted(self.proposers)))
        elif ev == "read":
            self.read(rng.choice(running))
        elif ev == "crash":
            ld = self.leader()
            self.crash(ld if ld is not None and rng.random() < 0.3 else rng.choice(running))
        elif ev == "restart":
            self.restart(rng.choice(crashed))
        elif ev == "partition":
            self.partition()
        elif ev == "heal":
            self.blocked.clear()
            self.log("heal")
        elif ev == "freeze":
            n = rng.choice(running)
            n.frozen = True
            self.log("freeze", n.name)
        elif ev == "resume":
            n = rng.choice(frozen)
            n.frozen = False
            self.log("resume", n.name)
            self._after(n)
        elif ev == "conf":
            ld = self.leader()
            if ld is not None:
                self.conf_change(ld)
        elif ev == "compact":
            n = rng.choice(running)
            self.compact(n)
        elif ev == "fetch":
            self.complete_fetch(rng.choice(fetching))

    def converged(self) -> SimNode | None:
        ld = self.leader()
        if ld is None:
            return None
        m = ld.m
        if m.commit != m.last_index or ld.store.applied != m.last_index or m.pending_conf():
            return None
        for name in m.conf.members():
            n = self.nodes.get(name)
            if n is None or n.m is None or n.store.applied != m.last_index:
                return None
        return ld

    def settle(self) -> SimNode:
        """Heal everything, restart the crashed, then the cluster must converge and commit."""
        p = self.p
        p.loss = p.dup = p.mid_crash = 0.0
        p.sync = 1.0
        self.blocked.clear()
        self.log("settle")
        for n in self.nodes.values():
            n.frozen = False
        for n in list(self.nodes.values()):
            if n.m is None:
                self.restart(n)
        for n in self.running():
            self.drain(n)
        probe, asked = None, None
        for i in range(SETTLE_EVENTS):
            self.now += 1
            ld = self.converged()
            if ld is not None:
                if probe is None:      # liveness: a fresh write commits everywhere
                    probe = f"c{len(self.changes)}"
                    self.propose(ld)
                    asked = (ld.name, ld.m.term, i)
                elif probe in self.acked:
                    return ld
                elif asked[:2] != (ld.name, ld.m.term) or i - asked[2] > 2000:
                    self.propose(ld, probe)   # the client retries at the new leader
                    asked = (ld.name, ld.m.term, i)
            fetching = [n for n in self.running() if n.fetch is not None]
            r = self.rng.random()
            if fetching and r < 0.1:
                self.complete_fetch(fetching[0])
            elif self.inflight and (r < 0.92 or len(self.inflight) > 30):
                self.deliver()
            else:
                self.tick()
            self.check()
        ld = self.leader()
        self.fail(f"liveness: no convergence within {SETTLE_EVENTS} settle events; leader "
                  f"{ld and ld.name} " + ", ".join(
                      f"{n.name}:{'down' if n.m is None else f'{n.m.role.value} t{n.m.term} c{n.m.commit} a{n.store.applied} li{n.m.last_index}'}"
                      for n in self.nodes.values()))

    def run(self) -> "Sim":
        try:
            for _ in range(self.p.events):
                self.now += 1
                self.step_random()
                self.check()
            ld = self.settle()
            self.check_final(ld)
        except Invariant as exc:
            raise SimFailure(self.report(str(exc))) from None
        except Exception as exc:  # the machine must never raise
            tb = "".join(traceback.format_exception(exc)[-6:])
            raise SimFailure(self.report(f"exception: {exc!r}\n{tb}")) from exc
        return self

    def report(self, why: str) -> str:
        lines = [f"seed {self.seed}: {why}", f"replay: {REPLAY.format(seed=self.seed)}",
                 f"params: {self.p}", "last events:"]
        for t, what in self.trace:
            lines.append(f"  {t:5d} " + " ".join(
                _fmt_msg(w) if isinstance(w, Message) else str(w) for w in what))
        return "\n".join(lines)


_EVENTS = ("deliver", "tick", "tick_one", "ready", "propose", "retry", "read", "crash",
           "restart", "partition", "heal", "freeze", "resume", "conf", "compact", "fetch")


def _to(m: Message) -> str:
    return m.to


def run_schedule(seed: int, machine_cls=Machine, **overrides) -> Sim:
    return Sim(seed, machine_cls=machine_cls, **overrides).run()


def run_seeds(seeds, machine_cls=Machine, **overrides) -> tuple[int, str | None]:
    """Run schedules in order; (schedules run, first failure report or None)."""
    n = 0
    for seed in seeds:
        n += 1
        try:
            run_schedule(seed, machine_cls, **overrides)
        except SimFailure as exc:
            return n, str(exc)
    return n, None
