"""Raft as a pure state machine (etcd-io/raft's raft.go + rawnode.go).

Events come in (tick, step, propose, ...); what the driver must do comes out
as a ``Ready``.  The role is the function: each ``become_*`` swaps the step,
tick, propose and read handlers, so handlers never ask "am I the leader?".
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from server.raft import membership
from server.raft.election import ElectionMixin
from server.raft.leader import LeaderMixin
from server.raft.log import RaftLog
from server.raft.readonly import PendingReads
from server.raft.types import (CONF, NORMAL, Config, Entry, FetchSnapshot, HardState,
                               Message, MsgType, ReadState, Ready, Role, SnapshotMeta, SoftState)


# Messages that are not bound to a term (forwarded requests and their answers).
_TERMLESS = (MsgType.PROP, MsgType.READ, MsgType.READ_RESP)
_FROM_LEADER = (MsgType.APP, MsgType.HB, MsgType.SNAP)


def _noop(*_args) -> None:
    return None


class Machine(ElectionMixin, LeaderMixin):
    def __init__(self, cfg: Config, rng: random.Random, *,
                 hard_state: HardState = HardState(),
                 snapshot: SnapshotMeta = SnapshotMeta(),
                 entries: Sequence[Entry] = ()):
        self.cfg, self.rng, self.node = cfg, rng, cfg.node
        self.log = RaftLog(snapshot, entries)
        self.term, self.vote, self.leader = hard_state.term, hard_state.vote, ""
        # Stored commit may only cover stored entries.
        self.log.commit = max(snapshot.index, min(hard_state.commit, self.log.last_index))
        self.conf = snapshot.conf
        self._conf_index = snapshot.index          # last CONF entry folded into self.conf
        self._conf_hist = [(snapshot.index, snapshot.conf)]
        for e in self.log.slice(snapshot.index + 1, self.log.commit):
            if e.kind == CONF:
                self._fold_conf(e)
        self.prs: dict = {}
        self.votes: dict[str, bool] = {}
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self._reads = PendingReads()
        self._props: list[Entry] = []          # follower: proposals to forward at the next Ready
        self._needs_bcast = False              # leader: send APPs at the next Ready
        self._fetch: FetchSnapshot | None = None
        self._ticks = 0
        self.election_elapsed = self.heartbeat_elapsed = self._timeout = 0
        self.pending_conf_index = 0
        self._leave: Callable = _noop
        self.become_follower(self.term, "")
        self._prev_hs = hard_state
        self._prev_ss = self._soft_state()

    # ---- role switching ----
    def _set_role(self, role: Role, step: Callable, tick: Callable, *,
                  propose: Callable | None = None, read: Callable | None = None,
                  persisted: Callable = _noop, conf_changed: Callable = _noop,
                  leave: Callable = _noop) -> None:
        self.role = role
        self._step, self._tick = step, tick
        self._propose = propose or (lambda e: False)
        self._read = read or self._read_no_leader
        self._persisted, self._conf_changed, self._leave = persisted, conf_changed, leave

    def _reset(self, term: int) -> None:
        self._leave()
        self._leave = _noop
        if term != self.term:
            self.term, self.vote = term, ""
        self.leader = ""
        self.election_elapsed = self.heartbeat_elapsed = 0
        self._timeout = self.cfg.election_tick + self.rng.randrange(self.cfg.election_tick)
        self.votes = {}
        self.pending_conf_index = 0

    def become_follower(self, term: int, leader: str) -> None:
        self._reset(term)
        self.leader = leader
        self._set_role(Role.FOLLOWER, self._step_follower, self._tick_election,
                       propose=self._follower_propose, read=self._follower_read)

    # ---- events ----
    def tick(self) -> None:
        self._ticks += 1
        self._tick()

    def step(self, m: Message) -> None:
        if m.to != self.node or m.frm == self.node:
            return
        if m.type in _TERMLESS:
            self._step(m)
            return
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PREVOTE):
                in_lease = (self.cfg.check_quorum and self.leader
                            and self.election_elapsed < self.cfg.election_tick)
                if in_lease:
                    return      # we hear a leader: do not help depose it
            if m.type == MsgType.PREVOTE or (m.type == MsgType.PREVOTE_RESP and not m.reject):
                pass            # pre-vote terms are not adopted
            else:
                self.become_follower(m.term, m.frm if m.type in _FROM_LEADER else "")
        elif m.term < self.term:
            if m.type in _FROM_LEADER:
                # Tell a stale leader about the newer term.
                self._send(MsgType.APP_RESP, m.frm)
            elif m.type in (MsgType.VOTE, MsgType.PREVOTE):
                self._send(MsgType.VOTE_RESP if m.type == MsgType.VOTE else MsgType.PREVOTE_RESP,
                           m.frm, reject=True)
            return
        if m.type in (MsgType.VOTE, MsgType.PREVOTE):
            self._handle_vote(m)
        else:
            self._step(m)

    def propose(self, data: Any, size: int = 0) -> bool:
        if self.node not in self.conf.members():
            return False
        return self._propose(Entry(0, 0, NORMAL, data, size))

    def propose_conf(self, op: str, node: str, addr: str = "") -> str | None:
        if self.role != Role.LEADER:
            return "not the leader"
        return self._propose_conf(op, node, addr)

    def bootstrap(self, voters: dict[str, str]) -> None:
        if self.log.last_index or self.term or not voters:
            return
        e = Entry(1, 1, CONF, membership.bootstrap_data(voters), 0)
        self.log.append([e])
        self.term = 1
        self.log.commit = 1
        self._fold_conf(e)

    def read_index(self, ctx: str) -> None:
        if self.node not in self.conf.members():
            self._read_done(ctx, self.node, 0)
        else:
            self._read(ctx, self.node)

    def restore(self, meta: SnapshotMeta) -> None:
        self._fetch = None
        if meta.index > self.log.applied:
            self.log.restore(meta)
            self.conf, self._conf_index = meta.conf, meta.index
            self._conf_hist = [(meta.index, meta.conf)]
            self._conf_changed()
        if self.leader and self.leader != self.node:
            # Tells the leader where to continue (it leaves snapshot state).
            self._send(MsgType.APP_RESP, self.leader, index=max(meta.index, self.log.commit))

    def compact(self, index: int) -> None:
        index = min(index, self.log.applied)
        if index <= self.log.snap.index:
            return
        conf = self.conf
        for i, c in self._conf_hist:
            if i <= index:
                conf = c
        self._conf_hist = [(i, c) for i, c in self._conf_hist if i > index]
        self._conf_hist.insert(0, (index, conf))
        self.log.compact(index, SnapshotMeta(index, self.log.term_at(index), conf))

    # ---- follower ----
    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t in _FROM_LEADER:
            self.election_elapsed = 0
            self.leader = m.frm
            if t == MsgType.APP:
                self._handle_append(m)
            elif t == MsgType.HB:
                self.log.commit_to(m.commit)
                self._send(MsgType.HB_RESP, m.frm, ctx=m.ctx)
            else:
                self._handle_snap(m)
        elif t == MsgType.PROP:
            # Only our own proposals: a PROP relayed between confused
            # followers could bounce.
            if m.frm == self.node and self.leader:
                self._send(MsgType.PROP, self.leader, term=0, entries=m.entries)
        elif t == MsgType.READ:
            self._send(MsgType.READ_RESP, m.frm, term=0, reject=True, ctx=m.ctx)
        elif t == MsgType.READ_RESP:
            self._read_resp(m)

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.commit:
            self._send(MsgType.APP_RESP, m.frm, index=self.log.commit)
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(MsgType.APP_RESP, m.frm, index=last_new)
        else:
            self._send(MsgType.APP_RESP, m.frm, index=m.index, reject=True,
                       hint=self.log.last_index)

    def _handle_snap(self, m: Message) -> None:
        if m.index <= self.log.commit:
            self._send(MsgType.APP_RESP, m.frm, index=self.log.commit)
        elif self.log.match_term(m.index, m.log_term):
            self.log.commit_to(m.index)
            self._send(MsgType.APP_RESP, m.frm, index=m.index)
        else:
            self._fetch = FetchSnapshot(m.frm, m.index, m.log_term)

    def _follower_propose(self, e: Entry) -> bool:
        if not self.leader:
            return False
        self._props.append(e)
        return True

    def _follower_read(self, ctx: str, frm: str) -> None:
        if self.leader:
            self._send(MsgType.READ, self.leader, term=0, ctx=ctx)
        else:
            self._read_done(ctx, frm, 0)

    def _read_resp(self, m: Message) -> None:
        self.read_states.append(ReadState(m.ctx, 0 if m.reject else m.index))

    def _read_done(self, ctx: str, frm: str, index: int) -> None:
        if frm == self.node:
            self.read_states.append(ReadState(ctx, index))
        else:
            self._send(MsgType.READ_RESP, frm, term=0, index=index, reject=index == 0, ctx=ctx)

    # ---- membership ----
    def _fold_conf(self, e: Entry) -> None:
        if e.index <= self._conf_index:
            return      # already in self.conf (restart, restore)
        self.conf = membership.apply(self.conf, e.data)
        self._conf_index = e.index
        self._conf_hist.append((e.index, self.conf))

    def pending_conf(self) -> bool:
        return self.pending_conf_index > self.log.applying

    # ---- output ----
    def _send(self, kind: MsgType, to: str, term: int | None = None, **kw) -> None:
        self.msgs.append(Message(kind, self.node, to, self.term if term is None else term, **kw))

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.commit)

    def _soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader, self.term)

    def _flush(self) -> None:
        if self._props:
            props, self._props = self._props, []
            self._step(Message(MsgType.PROP, self.node, self.node, entries=tuple(props)))
        if self._needs_bcast:
            self._needs_bcast = False
            self._bcast_append()

    def has_ready(self) -> bool:
        lg = self.log
        return bool(self.msgs or self.read_states or self._props or self._needs_bcast
                    or self._fetch or lg.handed < lg.last_index
                    or lg.applying < min(lg.commit, lg.stable)
                    or self._hard_state() != self._prev_hs
                    or self._soft_state() != self._prev_ss)

    def ready(self) -> Ready:
        self._flush()
        lg = self.log
        entries = lg.slice(lg.handed + 1, lg.last_index)
        lg.handed = lg.last_index
        committed = lg.slice(lg.applying + 1, min(lg.commit, lg.stable))
        if committed:
            lg.applying = committed[-1].index
            for e in committed:
                if e.kind == CONF and e.index > self._conf_index:
                    self._fold_conf(e)
                    self._conf_changed()
            self._flush()
        rd = Ready(entries=entries, messages=self.msgs, committed=committed,
                   read_states=self.read_states, fetch_snapshot=self._fetch)
        self.msgs, self.read_states, self._fetch = [], [], None
        hs, ss = self._hard_state(), self._soft_state()
        if hs != self._prev_hs:
            rd.hard_state = self._prev_hs = hs
        if ss != self._prev_ss:
            rd.soft_state = self._prev_ss = ss
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
            self._persisted()
        if rd.committed:
            self.log.applied = max(self.log.applied, rd.committed[-1].index)

    # ---- introspection ----
    @property
    def commit(self) -> int:
        return self.log.commit

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def last_index(self) -> int:
        return self.log.last_index

    @property
    def first_index(self) -> int:
        return self.log.offset

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self.log.snap

    def term_at(self, index: int) -> int | None:
        return self.log.term_at(index)

    def entries_from(self, lo: int, max_bytes: int) -> list[Entry]:
        return self.log.entries_from(lo, max_bytes) or []

    def progress(self) -> dict[str, tuple[int, int, str]]:
        return {n: (p.match, p.next, p.state) for n, p in self.prs.items()}
