"""The leader: replication to followers, commitment, heartbeats, check-quorum,
ReadIndex, membership proposals and learner auto-promotion."""
from __future__ import annotations

from server.raft import membership
from server.raft.progress import PROBE, REPLICATE, SNAPSHOT, Progress
from server.raft.types import CONF, NOOP, NORMAL, Entry, Message, MsgType, Role


class LeaderMixin:
    """Part of Machine: what only a leader does."""

    def become_leader(self) -> None:
        self._reset(self.term)
        self.leader = self.node
        self._set_role(Role.LEADER, self._step_leader, self._tick_heartbeat,
                       propose=self._leader_propose, read=self._leader_read,
                       persisted=self._leader_persisted, conf_changed=self._sync_progress,
                       leave=self._leader_leave)
        self._sync_progress()
        # Conservatively, anything in the log may be an unapplied CONF entry.
        self.pending_conf_index = self.log.last_index
        self._append([(NOOP, None, 0)])

    def _leader_leave(self) -> None:
        for ctx, frm in self._reads.drain():
            self._read_done(ctx, frm, 0)
        self.prs = {}
        self._needs_bcast = False

    # ---- progress bookkeeping ----
    def _sync_progress(self) -> None:
        """Make self.prs match the (applied) conf; step down if removed."""
        members = self.conf.members()
        if self.node not in members:
            self.become_follower(self.term, "")
            return
        for n in list(self.prs):
            if n not in members:
                del self.prs[n]
        for n in members:
            if n not in self.prs:
                self.prs[n] = Progress(self.log.last_index + 1, self.cfg.max_inflight, self._ticks)
        me = self.prs[self.node]
        me.match, me.next = self.log.stable, self.log.last_index + 1
        self._maybe_commit()

    def _leader_persisted(self) -> None:
        me = self.prs.get(self.node)
        if me is not None:
            me.maybe_update(self.log.stable)
            self._maybe_commit()

    def _maybe_commit(self) -> None:
        voters = self.conf.voters
        if not voters:
            return
        matches = sorted((self.prs[v].match if v in self.prs else 0 for v in voters), reverse=True)
        index = matches[membership.quorum(len(voters)) - 1]
        # Only an entry of our own term commits by counting (Raft §5.4.2).
        if index > self.log.commit and self.log.term_at(index) == self.term:
            self.log.commit_to(index)
            self._needs_bcast = True
            self._flush_waiting_reads()

    def quorum_active(self) -> bool:
        if self.role != Role.LEADER:
            return False
        alive = sum(1 for v in self.conf.voters
                    if v == self.node or (v in self.prs and
                                          self._ticks - self.prs[v].last_heard < self.cfg.election_tick))
        return alive >= membership.quorum(len(self.conf.voters))

    # ---- appending ----
    def _append(self, items) -> None:
        """Append (kind, data, size) items in this term; replication is sent
        at the next Ready so that proposals batch into one APP."""
        i = self.log.last_index
        self.log.append([Entry(self.term, i + k + 1, kind, data, size)
                         for k, (kind, data, size) in enumerate(items)])
        self._needs_bcast = True

    def _leader_propose(self, e: Entry) -> bool:
        self._append([(NORMAL, e.data, e.size)])
        return True

    def _propose_conf(self, op: str, node: str, addr: str) -> str | None:
        if self.pending_conf():
            return "a membership change is in progress"
        why = membership.refusal(self.conf, op, node)
        if why:
            return why
        if op == "remove" and node == self.node and len(self.conf.voters) == 2:
            # We step down once the removal is applied; the other voter may not
            # have heard it committed, so it still needs our vote, which our
            # longer log refuses: no leader ever again.  Remove the other one.
            return "the leader cannot remove itself from two voters"
        self._append([(CONF, {"op": op, "node": node, "addr": addr}, len(node) + len(addr))])
        self.pending_conf_index = self.log.last_index
        return None

    def _maybe_promote(self) -> None:
        if not self.cfg.auto_promote or self.pending_conf():
            return
        for n in sorted(self.conf.learners):
            pr = self.prs.get(n)
            if pr and pr.match >= self.log.last_index - self.cfg.promote_lag:
                self._propose_conf("promote", n, "")
                return

    # ---- sending ----
    def _send_append(self, to: str, if_empty: bool = True) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev = pr.next - 1
        prev_term = self.log.term_at(prev)
        ents = self.log.entries_from(pr.next, self.cfg.max_msg_bytes) if prev_term is not None else None
        if ents is None:
            return self._send_snap(to, pr)
        if not ents and not if_empty:
            return False
        self._send(MsgType.APP, to, index=prev, log_term=prev_term, entries=tuple(ents),
                   commit=self.log.commit)
        pr.sent(ents[-1].index if ents else prev, len(ents))
        return True

    def _send_snap(self, to: str, pr: Progress) -> bool:
        snap = self.log.snap
        pr.become_snapshot(snap.index)
        self._send(MsgType.SNAP, to, index=snap.index, log_term=snap.term)
        return True

    def _bcast_append(self) -> None:
        for n in self.prs:
            if n != self.node:
                self._send_append(n)

    def _bcast_heartbeat(self) -> None:
        ctx = self._reads.last_ctx()
        for n, pr in self.prs.items():
            if n != self.node:
                self._send(MsgType.HB, n, commit=min(pr.match, self.log.commit), ctx=ctx)

    # ---- timer ----
    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self.quorum_active():
                self.become_follower(self.term, "")
                return
        for n, pr in self.prs.items():
            if pr.state == SNAPSHOT:
                pr.snap_elapsed += 1
                if pr.snap_elapsed >= self.cfg.election_tick:
                    pr.become_probe()   # resend: the SNAP or the answer was lost
                    self._send_append(n)
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()
        self._maybe_promote()

    # ---- messages ----
    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MsgType.PROP:
            items = [(NORMAL, e.data, e.size) for e in m.entries
                     if isinstance(e, Entry) and e.kind == NORMAL]
            if items:
                self._append(items)
            return
        if t == MsgType.READ:
            self._leader_read(m.ctx, m.frm)
            return
        if t == MsgType.READ_RESP:
            self._read_resp(m)
            return
        pr = self.prs.get(m.frm)
        if pr is None or m.frm == self.node:
            return
        if t == MsgType.APP_RESP:
            pr.last_heard = self._ticks
            self._on_app_resp(m, pr)
        elif t == MsgType.HB_RESP:
            pr.last_heard = self._ticks
            self._on_hb_resp(m, pr)

    def _on_app_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            if pr.maybe_decr_to(m.index, m.hint):
                if pr.state == REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == PROBE:
            pr.become_replicate()
        elif pr.state == SNAPSHOT and (pr.match >= pr.pending_snapshot
                                       or pr.match + 1 >= self.log.offset):
            pr.become_probe()
            pr.become_replicate()
        before = self.log.commit
        self._maybe_commit()
        if self.log.commit == before and was_paused:
            self._send_append(m.frm)
        while self._send_append(m.frm, if_empty=False):
            pass
        if m.frm in self.conf.learners:
            self._maybe_promote()

    def _on_hb_resp(self, m: Message, pr: Progress) -> None:
        if m.ctx and m.frm in self.conf.voters:
            acks = self._reads.ack(m.ctx, m.frm)
            if acks is not None and len(acks & self.conf.voters) >= membership.quorum(len(self.conf.voters)):
                for ctx, frm, index in self._reads.release(m.ctx):
                    self._read_done(ctx, frm, index)
        if pr.state == SNAPSHOT or pr.match >= self.log.last_index:
            pr.stall = 0
            return
        # Behind: repair lost APPs.  A pipeline that made no progress over
        # two heartbeats lost something; probe again from match+1.
        pr.paused = False
        pr.stall += 1
        if pr.state == REPLICATE and pr.stall >= 2:
            pr.become_probe()
        self._send_append(m.frm, if_empty=pr.state == PROBE)

    # ---- ReadIndex ----
    def _committed_in_term(self) -> bool:
        return self.log.term_at(self.log.commit) == self.term

    def _leader_read(self, ctx: str, frm: str) -> None:
        if not self._committed_in_term():
            self._reads.waiting.append((ctx, frm))
            return
        if self.conf.voters == frozenset((self.node,)):
            self._read_done(ctx, frm, self.log.commit)
            return
        self._reads.add(ctx, frm, self.log.commit, self.node)
        self._bcast_heartbeat()

    def _flush_waiting_reads(self) -> None:
        if self._reads.waiting and self._committed_in_term():
            waiting, self._reads.waiting = self._reads.waiting, []
            for ctx, frm in waiting:
                self._leader_read(ctx, frm)
