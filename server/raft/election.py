"""Elections: the follower/candidate timers, (pre-)campaigns and voting."""
from __future__ import annotations

from server.raft import membership
from server.raft.types import CONF, Message, MsgType, Role

_RESP = {MsgType.VOTE: MsgType.VOTE_RESP, MsgType.PREVOTE: MsgType.PREVOTE_RESP}


class ElectionMixin:
    """Part of Machine: everything a follower, pre-candidate or candidate does
    that is about choosing a leader."""

    # ---- roles ----
    def become_pre_candidate(self) -> None:
        # Pre-vote changes neither term nor vote (thesis §9.6).
        self._set_role(Role.PRE_CANDIDATE, self._step_candidate, self._tick_election)
        self.leader = ""
        self.votes = {}

    def become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.node
        self._set_role(Role.CANDIDATE, self._step_candidate, self._tick_election)

    # ---- timer ----
    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if not self._promotable():
            return
        # A sole voter needs nobody: elect at once (fast single-node start).
        if (self.election_elapsed >= self._timeout
                or self.conf.voters == frozenset((self.node,))):
            self.election_elapsed = 0
            self._hup()

    def _promotable(self) -> bool:
        return self.node in self.conf.voters

    def _hup(self) -> None:
        if self._unapplied_conf():
            return
        self._campaign(pre=self.cfg.pre_vote)

    def _unapplied_conf(self) -> bool:
        """A committed CONF entry whose effect is not in self.conf yet."""
        lo = max(self.log.applying, self._conf_index) + 1
        return any(e.kind == CONF for e in self.log.slice(lo, self.log.commit))

    def _campaign(self, pre: bool) -> None:
        if pre:
            self.become_pre_candidate()
            kind, term = MsgType.PREVOTE, self.term + 1
        else:
            self.become_candidate()
            kind, term = MsgType.VOTE, self.term
        if self._poll(self.node, True):
            return
        for v in sorted(self.conf.voters):
            if v != self.node:
                self._send(kind, v, term=term, index=self.log.last_index,
                           log_term=self.log.last_term)

    def _poll(self, voter: str, granted: bool) -> bool:
        """Count a vote; acts on a decided election.  True if decided."""
        if voter in self.conf.voters:
            self.votes.setdefault(voter, granted)
        q = membership.quorum(len(self.conf.voters))
        yes = sum(1 for g in self.votes.values() if g)
        no = len(self.votes) - yes
        if yes >= q:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self.become_leader()
            return True
        if no > len(self.conf.voters) - q:
            self.become_follower(self.term, "")
            return True
        return False

    # ---- messages ----
    def _handle_vote(self, m: Message) -> None:
        """VOTE / PREVOTE at a term >= ours (term bookkeeping already done)."""
        pre = m.type == MsgType.PREVOTE
        can_vote = (self.vote == m.frm
                    or (not self.vote and not self.leader)
                    or (pre and m.term > self.term))
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(_RESP[m.type], m.frm, term=m.term)
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(_RESP[m.type], m.frm, reject=True)

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MsgType.APP, MsgType.HB, MsgType.SNAP):
            # Someone won this term.
            self.become_follower(m.term, m.frm)
            self._step(m)
        elif t == MsgType.VOTE_RESP and self.role == Role.CANDIDATE:
            self._poll(m.frm, not m.reject)
        elif t == MsgType.PREVOTE_RESP and self.role == Role.PRE_CANDIDATE:
            # A grant carries the term we asked for; a stale grant from an
            # earlier round must not count for this one.
            if m.reject or m.term == self.term + 1:
                self._poll(m.frm, not m.reject)
        elif t == MsgType.READ:
            self._send(MsgType.READ_RESP, m.frm, term=0, reject=True, ctx=m.ctx)
        elif t == MsgType.READ_RESP:
            self._read_resp(m)
        # PROP: dropped (no leader to take it).

    def _read_no_leader(self, ctx: str, frm: str) -> None:
        self._read_done(ctx, frm, 0)
