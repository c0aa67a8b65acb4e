"""The consensus protocol's vocabulary: entries, messages, hard state, Ready.

Pure data (no I/O, no clock).  The state machine (``machine.py``) consumes
events -- a Message, a tick, a proposal, "persisted up to" -- and hands back a
``Ready``; the driver (``server/node.py``) carries each Ready out in a fixed
order: persist, send, apply, answer, then ``Machine.advance(ready)``.
Terminology and behaviour follow the Raft paper / thesis and etcd-io/raft.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------
# Log entries
# ---------------------------------------------------------------------------
NORMAL = "normal"   # data: {"ts": float, "items": [change, ...]}   (opaque to the machine)
CONF = "conf"       # data: {"op": "add_learner"|"promote"|"remove", "node": str, "addr": str}
NOOP = "noop"       # data: None; a new leader's first entry (commits its term)


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    kind: str = NORMAL
    data: Any = None
    size: int = field(default=0, compare=False)   # approximate bytes of data (for batching)


@dataclass(frozen=True, slots=True)
class HardState:
    """Persisted (fsynced) before any message that depends on it is sent."""
    term: int = 0
    vote: str = ""      # node voted for in ``term`` ("" = none)
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """Who takes part.  Voters count for elections and commitment; learners
    only receive the log.  ``addrs``: node -> gRPC host:port (for catch-up)."""
    voters: frozenset = frozenset()
    learners: frozenset = frozenset()
    addrs: tuple = ()   # sorted tuple of (node, addr) pairs (hashable, deterministic)

    def addr(self, node: str) -> str:
        return dict(self.addrs).get(node, "")

    def members(self) -> frozenset:
        return self.voters | self.learners


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """State of the log covered by a snapshot: everything up to ``index``."""
    index: int = 0
    term: int = 0
    conf: ConfState = ConfState()


# ---------------------------------------------------------------------------
# Messages between machines (carried over MQTT as JSON by the driver)
# ---------------------------------------------------------------------------
class MsgType(str, enum.Enum):
    APP = "app"                  # append entries (index/log_term: the entry before them)
    APP_RESP = "app_resp"        # index: last index matched (or rejected index); hint: follower's last
    HB = "hb"                    # heartbeat: commit (min(match, leader commit)), ctx for ReadIndex
    HB_RESP = "hb_resp"          # ctx echoed
    VOTE = "vote"                # index/log_term: candidate's last entry
    VOTE_RESP = "vote_resp"      # reject: vote denied
    PREVOTE = "prevote"          # term: the term the candidate *would* use (not adopted)
    PREVOTE_RESP = "prevote_resp"
    PROP = "prop"                # follower -> leader: entries to append (term/index ignored)
    SNAP = "snap"                # leader -> follower: you need my snapshot at (index, log_term);
                                 # fetch it over gRPC, then Machine.restore()
    READ = "read"                # follower -> leader: ReadIndex request, ctx identifies it
    READ_RESP = "read_resp"      # leader -> follower: index to wait for (reject: no quorum/leader)


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    frm: str
    to: str
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple = ()          # tuple[Entry, ...]
    commit: int = 0
    reject: bool = False
    hint: int = 0
    ctx: str = ""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read with context ``ctx`` may be served once the local
    applied index is >= ``index``.  ``index`` = 0 means it failed (no leader /
    no quorum): answer the client with an error."""
    ctx: str
    index: int


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """The driver must fetch the leader's state over gRPC (Replica.FetchState)
    from ``frm`` (address in the conf or presence), install it, then call
    ``Machine.restore(meta)`` with the state's actual index/term/conf."""
    frm: str
    index: int
    term: int


class Role(str, enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    role: Role
    leader: str        # "" when unknown
    term: int


@dataclass(slots=True)
class Ready:
    """What the driver must do, in this order:
    1. persist ``hard_state`` (if not None) and ``entries`` (append; the first
       entry's index may be <= the stored last index: truncate the stored log
       from there first), fsync when there is a data dir;
    2. send ``messages``;
    3. apply ``committed`` to the store, in order (conf entries were already
       taken into account by the machine: the driver only records them);
    4. answer: ``read_states``, role/leader changes;
    5. call ``Machine.advance(ready)`` -- marks ``entries`` durable (the
       leader counts its own copy only now) and ``committed`` applied.
    """
    hard_state: HardState | None = None
    entries: list = field(default_factory=list)        # list[Entry], to persist
    messages: list = field(default_factory=list)       # list[Message], after persisting
    committed: list = field(default_factory=list)      # list[Entry], to apply
    read_states: list = field(default_factory=list)    # list[ReadState]
    soft_state: SoftState | None = None                # when role/leader/term changed
    fetch_snapshot: FetchSnapshot | None = None

    def empty(self) -> bool:
        return not (self.hard_state or self.entries or self.messages or self.committed
                    or self.read_states or self.soft_state
                    or self.fetch_snapshot)


@dataclass(frozen=True, slots=True)
class Config:
    node: str
    election_tick: int = 10        # ticks without a leader before a (pre-)campaign; randomized
                                   # in [election_tick, 2*election_tick) by the seeded rng
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_msg_bytes: int = 1 << 20   # rough bound on the entries of one APP
    max_inflight: int = 256        # APP messages in flight per follower (replicate state)
    auto_promote: bool = True      # leader promotes a learner once it has caught up
    promote_lag: int = 0           # ... i.e. once match >= leader's last index - promote_lag
