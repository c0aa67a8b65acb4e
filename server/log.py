"""The replicated, totally ordered change log over MQTT.

Design (details and the JSON fields in the README):

* One sequencer (the *leader*) gives every change its position.  Servers send
  proposals to ``kvs/<cluster>/propose``; the leader numbers them and publishes
  *batches* on ``kvs/<cluster>/log``.  Only one client publishes on the log
  topic, so MQTT's per-publisher ordering is what orders the log.
* Every server, the leader included, applies batches strictly in position
  order through ``_apply_batch`` — the only code that mutates the store — so
  all replicas hold the same versions with the same values.
* A batch carries ``first`` (its position) and ``prev`` (the chained hash of
  the log before it).  Position < expected: duplicate, dropped (a different
  payload at a known position proves divergence).  Position > expected: a gap
  (Mosquitto dropped messages); the server fetches the missing batches from a
  peer over gRPC, or takes a full state transfer when the peer no longer
  keeps them.  ``prev`` != own hash: diverged, state transfer.
* Heartbeats from the leader on the *same* topic announce the last position,
  so a dropped tail is noticed too.
* Idempotent retries: a client may tag a write with a request id
  (``kvs-request-id`` metadata); the change then carries ``c:<id>``, the
  leader sequences one id once, and every server keeps the settled outcomes
  of recent ids, so a retry through any server gets the first answer.
* Leadership: servers announce themselves with retained presence documents
  (and a retained "offline" will).  When the leader is gone (offline or
  silent for ``leader_timeout``), the online server with the smallest node id
  catches up from the most advanced peer and starts a new *epoch* with an
  ``epoch`` item.  Batches of older epochs are ignored.
* A write is acknowledged when two servers hold it (applied, and fsynced when
  a data dir is used): the leader and one follower's cumulative ack, or a
  leader alone.  Batches and heartbeats go out at QoS 0: a lost batch is a gap
  that positions already expose and repair fills, so the broker's PUBACKs
  (parsed in paho's thread for every batch) would buy nothing.

Threads: paho's network thread only enqueues; one *core* thread does all
sequencing, applying, repair and persistence; a proposer thread publishes
proposals; a ticker drives heartbeats, retries and elections.  Callers (the
gRPC server's coroutines) get asyncio futures; the core thread resolves every
result of one drain with a single wake-up of their loop (``LoopCompletions``).
The ticker expires unanswered changes after ``write_timeout``, so every future
resolves even if the core thread is stuck.
"""
from __future__ import annotations

import bisect
import collections
import asyncio
import enum
import itertools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

from . import codec
from .codec import Batch, BadMessage, Heartbeat
from .peers import LogTooOld, PeerClients
from .store import InvalidInput, Version, VersionedStore, check_key, check_value
from .transport import BrokerConfig, MqttTransport

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    version: int
    reason: str = ""
    # False for "we could not find out" answers (expired, storage failure, outcome
    # lost in a state transfer): a client's retry must not be answered from those.
    settled: bool = True


class Role(enum.Enum):
    FOLLOWER = "follower"
    LEADER = "leader"


@dataclass
class LogConfig:
    node_id: str
    address: str                       # gRPC host:port peers use to reach us
    cluster: str = "kvs"
    write_timeout: float = 10.0        # an Insere fails (-1) after this long
    retry_interval: float = 2.0        # re-send an unanswered proposal
    leader_timeout: float = 5.0        # leader silent this long -> elect
    heartbeat_interval: float = 0.2
    settle_time: float = 1.0           # after connecting, learn presence first
    startup_wait: float = 10.0         # after a restart, wait this long for known servers
    read_wait: float = 3.0             # a read waits this long for the node to be in step
    max_batch_items: int = 2000
    max_batch_bytes: int = 1 << 20
    keep_batches: int = 200_000        # recent batches kept in memory for peers' repair
    keep_bytes: int = 256 << 20
    recent_ids: int = 200_000          # proposal ids remembered for de-duplication
    client_results: int = 100_000      # outcomes kept for clients' retries (request ids)
    snapshot_every: int = 50_000       # applied changes between snapshots (with a data dir)
    max_value_len: int | None = None
    max_key_len: int | None = None


class LoopCompletions:
    """Results for coroutines on one asyncio loop (the gRPC server's).  ``new`` runs
    on the loop; ``deliver`` runs on any thread and wakes the loop once for a whole
    drain's results instead of once per change."""

    def __init__(self, loop) -> None:
        self.loop = loop

    def new(self):
        return self.loop.create_future()

    def deliver(self, pairs: list) -> None:
        if pairs:
            try:
                self.loop.call_soon_threadsafe(_set_results, pairs)
            except RuntimeError:  # loop closed: the server is gone, nobody waits
                pass


def _set_results(pairs: list) -> None:
    for fut, outcome in pairs:
        if not fut.done():
            fut.set_result(outcome)


@dataclass
class _Waiter:
    item: dict
    futures: list  # asyncio futures from LoopCompletions; a client's retry adds one
    deadline: float
    next_retry: float


@dataclass
class _Member:
    node: str
    addr: str = ""
    online: bool = False
    boot: str = ""
    epoch: int = 0
    applied: int = 0
    seen: float = 0.0   # monotonic time of its last presence document

    def alive(self, now: float, ttl: float) -> bool:
        # Servers re-announce every second; a document nobody refreshes (a
        # crashed server's, or a forged one) stops counting after ``ttl``.
        return self.online and now - self.seen < ttl


PRESENCE_INTERVAL = 1.0
PROPOSAL_MAX_AGE = 120.0  # seconds; older proposals may be outside the de-duplication window
PRESENCE_TTL = 10.0


class ReplicatedLog:
    def __init__(self, cfg: LogConfig, broker: BrokerConfig, completions: LoopCompletions,
                 store: VersionedStore | None = None, datadir=None,
                 peers: PeerClients | None = None,
                 on_state: Callable[[str], None] | None = None):
        self.cfg = cfg
        self._completions = completions
        self.node = cfg.node_id
        self.store = store if store is not None else VersionedStore()
        self.store_lock = threading.Lock()
        self.datadir = datadir
        self.peers = peers or PeerClients()
        self._on_state = on_state
        prefix = f"kvs/{cfg.cluster}"
        self.t_log, self.t_propose, self.t_nodes = f"{prefix}/log", f"{prefix}/propose", f"{prefix}/nodes"
        self.t_ack = f"{prefix}/ack"
        self.boot = os.urandom(4).hex()
        self._ids = itertools.count(1)

        # Log position (written by the core thread inside store_lock).
        self.applied = 0
        self.hash = codec.GENESIS_HASH
        self.epoch = 0
        self.leader = ""
        self.role = Role.FOLLOWER
        self._published = (0, codec.GENESIS_HASH)  # what the heartbeat announces
        self._leader_last = 0          # last position the leader announced
        self._leader_seen = 0.0        # monotonic time of the leader's last sign of life
        self._claimed = ""             # leader named by heartbeats not yet followed in the log
        self._diverged = False
        self._storage_error = ""       # set once the data dir failed (fail-stop)
        self._was_in_step = False
        self._gap_target = 0           # position we know exists but have not got
        self._repair_after = 0.0       # back-off for failed repairs
        self._state = "starting"
        self.started = time.time()

        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._tick_queued = False
        self._pending: dict[int, Batch] = {}      # out-of-order batches by first
        self._recent: list[tuple[int, int, bytes]] = []  # batches for peers' repair
        self._recent_bytes = 0
        self._recent_lock = threading.Lock()
        self._recent_ids: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._since_snapshot = 0

        self._waiting: dict[str, _Waiter] = {}
        self._waiting_lock = threading.Lock()
        # Settled outcomes of changes that carry a client's request id ("c:..."), so a
        # retry of the same request through any server gets the first answer.
        self._client_results: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        self._outbox: list[dict] = []
        self._outbox_cv = threading.Condition()
        # Leader: our clients' results wait until a second server has the batch.
        self._commit_wait: collections.deque[tuple[int, list[tuple[str, Outcome]]]] = \
            collections.deque()
        self._follower_acks: dict[str, int] = {}   # node -> position it applied (this epoch)
        self._ack_sent = 0                          # follower: last position acknowledged
        self._ack_time = 0.0
        self._known: set[str] = set()               # servers ever seen (kept in the data dir)

        self.members: dict[str, _Member] = {}
        self._connected_since = 0.0
        self._readable = threading.Event()
        self._snapshotting = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

        self.transport = MqttTransport(
            broker, client_id=f"kvs-{cfg.cluster}-{self.node}-{self.boot}",
            on_message=self._on_mqtt, on_connection=self._on_connection,
            will=(f"{self.t_nodes}/{self.node}", self._presence(False)))

    # =====================================================================
    # Public API (gRPC threads)
    # =====================================================================
    def start(self) -> None:
        if self.datadir is not None:
            self._recover()
        self.transport.subscribe(self.t_log)
        self.transport.subscribe(f"{self.t_nodes}/+")
        self.transport.start()
        for name, target in (("core", self._core_loop), ("proposer", self._proposer_loop),
                             ("ticker", self._ticker_loop)):
            t = threading.Thread(target=target, name=f"kvs-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stopping.set()
        self._events.put(("stop", None))
        with self._outbox_cv:
            self._outbox_cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        if self.transport.connected:
            info = self.transport.publish(f"{self.t_nodes}/{self.node}", self._presence(False),
                                          retain=True)
            if info is not None:
                try:
                    info.wait_for_publish(timeout=1.0)
                except (RuntimeError, ValueError):
                    pass
        self.transport.stop()
        with self._waiting_lock:
            waiters, self._waiting = list(self._waiting.values()), {}
        down = Outcome(-1, "server shutting down", settled=False)
        self._completions.deliver([(f, down) for w in waiters for f in w.futures])
        if self.datadir is not None:
            self.datadir.sync()
            self.datadir.close()
        self.peers.close()

    def submit_put(self, key: str, value: str, request_id: str | None = None):
        """An asyncio future (call on the loop) that resolves to an Outcome within
        ``write_timeout``: the version, or -1 and the reason.

        ``request_id``: the client's idempotency key.  A change is applied once per
        request id, whichever server a retry reaches: a server answers a retry with
        the first outcome, and the leader drops a proposal whose id it already
        sequenced (de-duplication window: ``recent_ids`` changes)."""
        return self._submit({"op": "put", "k": key, "v": value}, request_id)

    def submit_del(self, key: str, version: int | None, request_id: str | None = None):
        return self._submit({"op": "del", "k": key,
                             "ver": version if version is not None and version > 0 else None},
                            request_id)

    def readable_now(self) -> bool:
        return self._readable.is_set()

    def unreadable_reason(self) -> str:
        return f"server {self.node} is not in step with the cluster ({self._state})"

    @property
    def state(self) -> str:
        return self._state

    def status(self) -> dict:
        with self.store_lock:
            applied, h, keys = self.applied, self.hash, len(self.store)
        return {
            "node_id": self.node, "address": self.cfg.address,
            "broker_connected": self.transport.connected, "applied_seq": applied,
            "epoch": self.epoch, "leader": self.leader, "state": self._state,
            "keys": keys, "log_hash": h,
            "leader_seq": max(self._leader_last, applied) if self.role is Role.FOLLOWER else applied,
            "uptime": time.time() - self.started, "durable": self.datadir is not None,
            "snapshotting": self._snapshotting.is_set(),
            "peers": [(m.node, m.addr, m.alive(time.monotonic(), PRESENCE_TTL))
                      for m in sorted(self.members.values(), key=lambda m: m.node)],
        }

    # ---- serving peers (Replica service) -------------------------------------
    def batches_from(self, from_seq: int, to_seq: int = 0) -> list[bytes]:
        """Kept batches covering [from_seq, to_seq] (to_seq 0: to the newest)."""
        with self._recent_lock:
            recent = self._recent
            if not recent or from_seq < recent[0][0]:
                if recent or from_seq <= self.applied:
                    raise LogTooOld(f"log before position {recent[0][0] if recent else self.applied + 1}"
                                    " is no longer kept here")
                return []
            i = bisect.bisect_right(recent, (from_seq, float("inf"))) - 1
            out = []
            for first, last, payload in itertools.islice(recent, max(i, 0), None):
                if to_seq and first > to_seq:
                    break
                if last >= from_seq:
                    out.append(payload)
            return out

    def export_state(self, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Header document, then chunks of keys: a consistent state transfer."""
        with self.store_lock:
            header = {"t": "state", "seq": self.applied, "hash": self.hash, "epoch": self.epoch,
                      "leader": self.leader, "ids": list(self._recent_ids.items())[-50_000:]}
            keys = [(k, mx, list(vs)) for k, mx, vs in self.store.dump()]
        header["keys"] = len(keys)
        yield codec.encode(header)
        chunk, size = [], 0
        for key, mx, versions in keys:
            entry = [key, mx, [list(v) for v in versions]]
            chunk.append(entry)
            size += len(key) + sum(len(v.value) + 40 for v in versions) + 16
            if size >= chunk_bytes:
                yield codec.encode({"t": "keys", "keys": chunk})
                chunk, size = [], 0
        if chunk:
            yield codec.encode({"t": "keys", "keys": chunk})

    # =====================================================================
    # Submitting changes
    # =====================================================================
    def _submit(self, item: dict, request_id: str | None = None):
        fut = self._completions.new()
        if self._storage_error:
            self._completions.deliver([(fut, Outcome(-1, self._storage_error, settled=False))])
            return fut
        if not self.transport.connected:
            self._completions.deliver([(fut, Outcome(
                -1, "the message broker is unreachable; write not made", settled=False))])
            return fut
        iid = f"c:{request_id}" if request_id else f"{self.node}:{self.boot}:{next(self._ids)}"
        item["id"] = iid
        item["node"] = self.node
        now = time.monotonic()
        with self._waiting_lock:
            # Checked and registered under the lock that _resolve_mine records
            # results under, so a retry cannot fall between the two.
            settled = self._client_results.get(iid) if request_id else None
            waiter = self._waiting.get(iid) if settled is None else None
            if waiter is not None:
                waiter.futures.append(fut)  # already proposed; the ticker re-sends it
            elif settled is None:
                self._waiting[iid] = _Waiter(item, [fut], now + self.cfg.write_timeout,
                                             now + self.cfg.retry_interval)
        if settled is not None:
            self._completions.deliver([(fut, settled)])
        elif waiter is None:
            self._send(item)
        return fut

    def _send(self, item: dict) -> None:
        if self.role is Role.LEADER:
            self._events.put(("local", item))
        else:
            with self._outbox_cv:
                self._outbox.append(item)
                if len(self._outbox) == 1:
                    self._outbox_cv.notify()

    def _proposer_loop(self) -> None:
        """Publishes everything that queued up meanwhile as one proposal."""
        while not self._stopping.is_set():
            with self._outbox_cv:
                while not self._outbox and not self._stopping.is_set():
                    self._outbox_cv.wait()
                items, self._outbox = self._outbox, []
            if self.role is Role.LEADER:  # became leader meanwhile
                for it in items:
                    self._events.put(("local", it))
                continue
            for chunk in _chunks(items, self.cfg.max_batch_items, self.cfg.max_batch_bytes):
                # Unsent proposals are simply retried by the ticker.
                self.transport.publish(self.t_propose,
                                       codec.proposal_doc(self.node, chunk, time.time()))

    def _resolve_mine(self, results: list[tuple[str, Outcome]]) -> None:
        """Answer the waiting clients; remember settled outcomes of request ids."""
        if not results:
            return
        pairs = []
        kept = self._client_results
        with self._waiting_lock:
            for iid, o in results:
                w = self._waiting.pop(iid, None)
                if w is not None:
                    pairs += [(f, o) for f in w.futures]
                if o.settled and iid.startswith("c:"):
                    kept[iid] = o
            while len(kept) > self.cfg.client_results:
                kept.popitem(last=False)
        self._completions.deliver(pairs)

    def _retry_and_expire(self) -> None:
        now = time.monotonic()
        expired, resend = [], []
        with self._waiting_lock:
            for wid, w in self._waiting.items():
                if now >= w.deadline:
                    expired.append(wid)
                elif now >= w.next_retry:
                    w.next_retry = now + self.cfg.retry_interval
                    resend.append(w.item)
            gone = [self._waiting.pop(wid) for wid in expired]
        expired_reason = Outcome(-1, f"change not replicated within {self.cfg.write_timeout:g}s"
                                     " (no sequencer reachable); it may still be applied later",
                                 settled=False)
        self._completions.deliver([(f, expired_reason) for w in gone for f in w.futures])
        if resend and self.transport.connected:
            log.info("re-sending %d unanswered proposals", len(resend))
            for item in resend:
                self._send(item)

    # =====================================================================
    # MQTT callbacks (paho thread): enqueue only
    # =====================================================================
    def _on_mqtt(self, topic: str, payload: bytes) -> None:
        if topic == self.t_log:
            self._events.put(("log", payload))
        elif topic == self.t_propose:
            self._events.put(("propose", payload))
        elif topic == self.t_ack:
            self._events.put(("ack", payload))
        elif topic.startswith(self.t_nodes + "/"):
            self._events.put(("presence", payload))

    def _on_connection(self, up: bool) -> None:
        self._events.put(("conn", up))

    def _presence(self, online: bool) -> bytes:
        return codec.presence_doc(self.node, self.cfg.address, online, self.epoch, self.applied,
                                  self.boot)

    # =====================================================================
    # The core thread
    # =====================================================================
    def _core_loop(self) -> None:
        while True:
            events = [self._events.get()]
            try:
                while len(events) < 5000:
                    events.append(self._events.get_nowait())
            except queue.Empty:
                pass
            to_sequence: list[dict] = []
            ready: list[tuple[str, Outcome]] = []
            tick = False
            for kind, data in events:
                try:
                    if kind == "stop":
                        return
                    elif kind == "log":
                        ready += self._handle_log(data)
                    elif kind == "local":
                        if self.role is Role.LEADER:
                            to_sequence.append(data)
                    elif kind == "propose":
                        if self.role is Role.LEADER:
                            try:
                                prop = codec.decode_proposal(data)
                            except BadMessage as e:
                                _warn_garbage("proposal", e, data)
                                continue
                            if abs(time.time() - prop.ts) > PROPOSAL_MAX_AGE:
                                _warn_garbage("proposal", BadMessage("too old (a replay?)"), data)
                                continue
                            to_sequence += prop.items
                    elif kind == "ack":
                        self._handle_ack(data)
                    elif kind == "presence":
                        self._handle_presence(data)
                    elif kind == "conn":
                        self._handle_connection(data)
                    elif kind == "tick":
                        tick = True  # after everything that arrived before it
                except Exception:
                    log.exception("error in core loop handling %s", kind)
            if tick:
                self._tick_queued = False
                try:
                    ready += self._tick()
                except Exception:
                    log.exception("error in periodic work")
            published: list[tuple[int, list[tuple[str, Outcome]]]] = []
            if to_sequence and self.role is Role.LEADER:
                published = self._sequence(to_sequence)
            if self.datadir is not None:
                try:
                    self.datadir.sync()  # group commit: one fsync for all drained (no-op if none)
                except Exception as e:
                    # Fail-stop: nothing more is acknowledged as durable.
                    log.critical("cannot make changes durable: %s; refusing writes", e)
                    self._storage_error = f"storage failure on {self.node}: {e}"
                    fail = Outcome(-1, self._storage_error, settled=False)
                    ready = [(i, fail) for i, _ in ready]
                    published = [(last, [(i, fail) for i, _ in res]) for last, res in published]
            self._resolve_mine(ready)
            if self.role is Role.LEADER:
                self._commit_wait.extend(published)
                self._release_committed()
            else:
                self._send_ack()
            self._update_state()

    # ---- sequencing (leader) ------------------------------------------------
    def _sequence(self, items: list[dict]) -> list[tuple[int, list[tuple[str, Outcome]]]]:
        fresh, seen = [], set()
        for it in items:
            iid = it.get("id")
            if iid in seen or iid in self._recent_ids:
                continue  # a re-sent proposal that already has its place
            seen.add(iid)
            try:
                check_key(it["k"], self.cfg.max_key_len)
                if it["op"] == "put":
                    check_value(it["v"], self.cfg.max_value_len)
            except (InvalidInput, KeyError) as e:
                log.warning("dropping invalid proposal %s: %s", iid, e)
                continue
            fresh.append(it)
        out = []
        for chunk in _chunks(fresh, self.cfg.max_batch_items, self.cfg.max_batch_bytes):
            r = self._publish_batch(chunk)
            if r is None:
                break
            out.append(r)
        return out

    def _publish_batch(self, items: list[dict], epoch: int | None = None):
        """Sequence, apply and publish one batch; returns (last position, our
        clients' outcomes), which are released once the batch is committed."""
        if not self.transport.connected:
            self._step_down("lost the broker connection")
            return None
        epoch = epoch or self.epoch
        ts = time.time()
        payload = codec.batch_doc(epoch, self.node, self.applied + 1, self.hash, ts, items)
        batch = Batch(epoch, self.node, self.applied + 1, self.hash, ts, items, payload)
        mine = self._apply_batch(batch)
        info = self.transport.publish(self.t_log, payload, qos=0)
        if info is None:
            # Applied here but not published: nobody else has it.  Stop leading;
            # the next leader's log wins and we repair by state transfer.
            self._diverged = True
            self._step_down("could not publish a batch")
            lost = Outcome(-1, "lost the broker while replicating", settled=False)
            self._resolve_mine([(i, lost) for i, _ in mine])
            return None
        self._published = (batch.last, batch.hash)
        return batch.last, mine

    # ---- commit: a write is acknowledged once two servers hold it ---------------
    def _send_ack(self, again: bool = False) -> None:
        """Follower: tell the leader how far we applied (after the fsync).
        Acks are cumulative and cheap (QoS 0); the ticker repeats the last one
        in case it was lost."""
        if (self.applied > self._ack_sent or again) and self.applied and self.leader \
                and self.transport.connected:
            doc = codec.encode({"t": "ack", "node": self.node, "epoch": self.epoch,
                                "applied": self.applied})
            if self.transport.publish(self.t_ack, doc, qos=0) is not None:
                self._ack_sent = self.applied
                self._ack_time = time.monotonic()

    def _handle_ack(self, payload: bytes) -> None:
        if self.role is not Role.LEADER:
            return
        try:
            doc = codec.decode_ack(payload)
        except BadMessage as e:
            _warn_garbage("ack", e, payload)
            return
        if doc.epoch == self.epoch and doc.node in self.members and doc.applied <= self.applied:
            if doc.applied > self._follower_acks.get(doc.node, 0):
                self._follower_acks[doc.node] = doc.applied
                self._release_committed()

    def _release_committed(self) -> None:
        """Release results of batches that a second (alive) server applied; a
        leader alone in the cluster commits on its own."""
        if not self._commit_wait:
            return
        now = time.monotonic()
        peers = [m.node for m in self.members.values()
                 if m.node != self.node and m.alive(now, PRESENCE_TTL)]
        commit = (max((self._follower_acks.get(n, 0) for n in peers), default=0)
                  if peers else self.applied)
        released = []
        while self._commit_wait and self._commit_wait[0][0] <= commit:
            released += self._commit_wait.popleft()[1]
        self._resolve_mine(released)

    def _fail_unconfirmed(self, reason: str) -> None:
        pending, self._commit_wait = self._commit_wait, collections.deque()
        for _, results in pending:
            self._resolve_mine([(i, Outcome(-1, reason, settled=False)) for i, _ in results])

    # ---- applying -------------------------------------------------------------
    def _apply_batch(self, b: Batch, persist: bool = True) -> list[tuple[str, Outcome]]:
        """The only place the store changes.  Returns outcomes of our own items."""
        mine = []
        store, node = self.store, self.node
        with self.store_lock:
            for i, it in enumerate(b.items):
                op = it["op"]
                if op == "put":
                    ver = store.insert(it["k"], it["v"], b.first + i, b.ts, it["node"])
                    out = Outcome(ver, "" if ver > 0 else "version numbers of this key are exhausted")
                elif op == "del":
                    key, ver = it["k"], it.get("ver")
                    known = key in store
                    removed = store.remove(key, ver)
                    if removed > 0:
                        out = Outcome(removed)
                    elif not known:
                        out = Outcome(-1, f"key {key!r} is unknown or has no live versions")
                    else:
                        out = Outcome(-1, f"key {key!r} has no version {ver}")
                else:  # epoch: a new sequencer took over here
                    continue
                iid = it["id"]
                self._recent_ids[iid] = b.first + i
                # A client's request id may be waited for here even though another
                # server proposed it (the client retried through us).
                if it["node"] == node or iid.startswith("c:"):
                    mine.append((iid, out))
            self.applied, self.hash = b.last, b.hash
            if b.epoch != self.epoch or b.leader != self.leader:
                log.info("following %s in epoch %d from position %d", b.leader, b.epoch, b.first)
                if b.leader == self._claimed:
                    self._claimed = ""
            self.epoch, self.leader = b.epoch, b.leader
        while len(self._recent_ids) > self.cfg.recent_ids:
            self._recent_ids.popitem(last=False)
        self._keep(b)
        if persist and self.datadir is not None:
            self.datadir.append(b.first, b.last, b.payload)
            self._since_snapshot += len(b.items)
        if b.leader != self.node:
            self._leader_seen = time.monotonic()
            self._leader_last = max(self._leader_last, b.last)
        return mine

    def _keep(self, b: Batch) -> None:
        with self._recent_lock:
            self._recent.append((b.first, b.last, b.payload))
            self._recent_bytes += len(b.payload)
            if len(self._recent) > self.cfg.keep_batches or self._recent_bytes > self.cfg.keep_bytes:
                drop = max(len(self._recent) // 10, 1)
                self._recent_bytes -= sum(len(p) for _, _, p in self._recent[:drop])
                del self._recent[:drop]

    def _kept_payload(self, first: int) -> bytes | None:
        """The bytes of the kept batch that starts at ``first``, if any."""
        with self._recent_lock:
            i = bisect.bisect_left(self._recent, (first,))
            if i < len(self._recent) and self._recent[i][0] == first:
                return self._recent[i][2]
        return None

    def _handle_log(self, payload: bytes) -> list[tuple[str, Outcome]]:
        try:
            doc = codec.decode_log(payload)
        except BadMessage as e:
            _warn_garbage("log", e, payload)
            return []
        if isinstance(doc, Heartbeat):
            return self._handle_heartbeat(doc)
        return self._handle_batch(doc)

    def _stale(self, epoch: int, leader: str) -> bool:
        """A claim by a sequencer we do not follow: ourselves, a server that
        never announced itself, an older epoch, or a second claimant of the
        epoch we already follow."""
        if leader == self.node:
            return True
        m = self.members.get(leader)
        if m is None or not m.online:
            return True  # only a server that announced itself can lead
        # One leader per epoch: the first one followed (like a vote in Raft).
        return epoch < self.epoch or (epoch == self.epoch and bool(self.leader)
                                      and leader != self.leader)

    def _competing_claim(self, epoch: int, leader: str) -> None:
        """A leader that hears another (announced) server lead this or a later
        epoch steps down; the election then starts a new epoch from the most
        advanced log, so writes only one claimant committed are kept."""
        if self.role is Role.LEADER and leader != self.node and epoch >= self.epoch:
            m = self.members.get(leader)
            if m is not None and m.online:
                self._step_down(f"{leader} claims epoch {epoch}")

    def _handle_batch(self, b: Batch) -> list[tuple[str, Outcome]]:
        self._competing_claim(b.epoch, b.leader)
        if self._stale(b.epoch, b.leader):
            return []  # a deposed sequencer's late batch, or our own
        if b.last <= self.applied:
            kept = self._kept_payload(b.first)
            if kept is not None and kept != b.payload:
                self._mark_diverged(b.leader, f"position {b.first} differs from {b.leader}'s")
            return []  # duplicate (a redelivery or already repaired)
        if b.first <= self.applied:
            self._mark_diverged(b.leader, f"batch {b.first}-{b.last} overlaps our log")
            return []
        if b.first > self.applied + 1:
            if len(self._pending) < 10_000:
                self._pending[b.first] = b
            self._gap_target = max(self._gap_target, b.first - 1)
            return self._repair(b.leader)
        return self._apply_in_order(b)

    def _apply_in_order(self, b: Batch) -> list[tuple[str, Outcome]]:
        if b.prev != self.hash:
            self._mark_diverged(b.leader, f"hash chain breaks at position {b.first}")
            return []
        out = self._apply_batch(b)
        # Anything that was waiting for this one?
        while self._pending:
            nxt = self._pending.pop(self.applied + 1, None)
            if nxt is None:
                for first in [f for f, p in self._pending.items() if p.last <= self.applied]:
                    del self._pending[first]
                break
            if nxt.prev != self.hash:
                self._mark_diverged(nxt.leader, f"hash chain breaks at position {nxt.first}")
                break
            out += self._apply_batch(nxt)
        return out

    def _handle_heartbeat(self, hb: Heartbeat) -> list[tuple[str, Outcome]]:
        self._competing_claim(hb.epoch, hb.leader)
        if self._stale(hb.epoch, hb.leader):
            return []
        self._leader_seen = time.monotonic()
        self._leader_last = max(self._leader_last, hb.last)
        # A leader we know of before its epoch item reaches us (the applied
        # log alone decides what is stale).
        self._claimed = hb.leader if hb.leader != self.leader else ""
        if hb.last > self.applied or hb.epoch > self.epoch:
            self._gap_target = max(self._gap_target, hb.last)
            return self._repair(hb.leader)
        if hb.last == self.applied and hb.hash != self.hash:
            self._mark_diverged(hb.leader, f"hash at position {hb.last} differs from the leader's")
        return []

    # ---- repair ------------------------------------------------------------
    def _repair(self, source: str) -> list[tuple[str, Outcome]]:
        """Fetch what we are missing, from ``source`` first, then other peers."""
        if time.monotonic() < self._repair_after:
            return []
        out: list[tuple[str, Outcome]] = []
        for node, addr in self._peer_addrs(prefer=source):
            try:
                if not self._diverged:
                    log.info("fetching log from position %d from %s", self.applied + 1, node)
                    for payload in self.peers.fetch_log(addr, self.applied + 1, 0):
                        b = codec.decode_batch(payload)
                        if b.last <= self.applied:
                            continue
                        if b.first != self.applied + 1 or b.prev != self.hash:
                            self._mark_diverged(node, f"{node}'s log does not continue ours at {b.first}")
                            break
                        out += self._apply_batch(b)
                if self._diverged:
                    out += self._state_transfer(addr)
                out += self._apply_in_order_pending()
                if node == (self._claimed or self.leader):
                    # The sequencer publishes nothing it has not applied: what it
                    # lacks does not exist (forged, or a deposed leader's).
                    self._gap_target = 0
                    self._pending.clear()
                    self._leader_last = self.applied
                if self._gap_target <= self.applied:
                    self._gap_target = 0
                    return out
            except LogTooOld:
                out += self._state_transfer(addr)
                return out
            except Exception as e:  # peer down, timeout, bad data: try the next
                log.warning("repair from %s failed: %s", node, e)
        self._repair_after = time.monotonic() + 0.5
        return out

    def _apply_in_order_pending(self) -> list[tuple[str, Outcome]]:
        nxt = self._pending.pop(self.applied + 1, None)
        return self._apply_in_order(nxt) if nxt is not None else []

    def _mark_diverged(self, source: str, why: str) -> None:
        log.error("replica diverged: %s; taking a state transfer", why)
        self._diverged = True
        self._update_state()

    def _state_transfer(self, addr: str) -> list[tuple[str, Outcome]]:
        log.warning("state transfer from %s", addr)
        started = time.monotonic()
        it = self.peers.fetch_state(addr)
        header = json.loads(next(it))
        if header.get("t") != "state":
            raise BadMessage("state transfer did not start with a header")
        fresh = VersionedStore()
        n = 0
        for blob in it:
            doc = json.loads(blob)
            for key, mx, versions in doc["keys"]:
                fresh.load_key(key, mx, [Version(*v) for v in versions])
                n += 1
        if n != header["keys"]:
            raise BadMessage(f"state transfer incomplete: {n} of {header['keys']} keys")
        with self.store_lock:
            self.store = fresh
            self.applied, self.hash = header["seq"], header["hash"]
            self.epoch, self.leader = header["epoch"], header["leader"]
        self._recent_ids = collections.OrderedDict((i, s) for i, s in header["ids"])
        with self._recent_lock:
            self._recent, self._recent_bytes = [], 0
        self._pending = {f: p for f, p in self._pending.items() if p.first > self.applied}
        self._diverged = False
        self._leader_last = max(self._leader_last, self.applied)
        if self._gap_target <= self.applied:
            self._gap_target = 0
        if self.datadir is not None:
            # Replace the old history on disk with the transferred state.
            self.datadir.reset(self._snapshot_state())
            self._since_snapshot = 0
        log.warning("state transfer done: %d keys at position %d in %.2fs", n,
                    self.applied, time.monotonic() - started)
        # Our own writes whose batches we skipped: look their outcome up.
        out = []
        with self._waiting_lock:
            waiting = list(self._waiting.values())
        for w in waiting:
            seq = self._recent_ids.get(w.item["id"])
            if seq is None:
                continue
            found = next((v for v in self.store.history(w.item["k"]) if v.seq == seq), None)
            if w.item["op"] == "put" and found is not None:
                out.append((w.item["id"], Outcome(found.number)))
            else:
                out.append((w.item["id"], Outcome(
                    -1, "applied during a state transfer; outcome unknown", settled=False)))
        return out + self._apply_in_order_pending()

    def _peer_addrs(self, prefer: str = "") -> list[tuple[str, str]]:
        now = time.monotonic()
        ms = [m for m in self.members.values()
              if m.alive(now, PRESENCE_TTL) and m.node != self.node and m.addr]
        ms.sort(key=lambda m: (m.node != prefer, -m.applied, m.node))
        return [(m.node, m.addr) for m in ms]

    # ---- membership and leadership ---------------------------------------------
    def _handle_presence(self, payload: bytes) -> None:
        try:
            p = codec.decode_presence(payload)
        except BadMessage as e:
            _warn_garbage("presence", e, payload)
            return
        if p.node == self.node:
            return
        m = self.members.setdefault(p.node, _Member(p.node))
        if not p.online and m.online and p.boot and m.boot and p.boot != m.boot:
            return  # the will of an earlier incarnation
        m.addr, m.online, m.boot, m.epoch, m.applied = p.addr, p.online, p.boot, p.epoch, p.applied
        m.seen = time.monotonic()
        if p.online and p.node not in self._known:
            self._known.add(p.node)
            self._save_known()
        if self.role is Role.LEADER and p.online and (p.epoch, p.applied) > (self.epoch, self.applied):
            # Position decides: a longer log than ours must not be overwritten.
            self._step_down(f"{p.node} is ahead (epoch {p.epoch}, position {p.applied})")
        elif self.role is Role.LEADER:
            self._release_committed()  # the set of live servers may have changed
        if not p.online and p.node == self.leader:
            log.warning("leader %s went offline", p.node)

    def _handle_connection(self, up: bool) -> None:
        if up:
            self._connected_since = time.monotonic()
            self._announce()
        else:
            self._connected_since = 0.0
            if self.role is Role.LEADER:
                self._step_down("lost the broker connection")

    def _announce(self) -> None:
        self.transport.publish(f"{self.t_nodes}/{self.node}", self._presence(True), retain=True)

    def _step_down(self, why: str) -> None:
        if self.role is Role.LEADER:
            log.warning("stepping down as sequencer: %s", why)
            self.role = Role.FOLLOWER
            self.transport.unsubscribe(self.t_propose)
            self.transport.unsubscribe(self.t_ack)
            self._ack_sent = 0
            self._fail_unconfirmed(f"sequencer changed ({why}); write outcome unknown")
            self._leader_seen = 0.0

    def _leader_alive(self) -> bool:
        if self.role is Role.LEADER:
            return True
        if time.monotonic() - self._leader_seen >= self.cfg.leader_timeout:
            return False
        now = time.monotonic()
        for name in (self.leader, self._claimed):
            m = self.members.get(name) if name else None
            if m is not None and m.alive(now, PRESENCE_TTL):
                return True
        return False

    def _maybe_elect(self) -> None:
        if self.role is Role.LEADER or not self.transport.connected or self._leader_alive():
            return
        if self._events.qsize():
            return  # judge liveness only after reading everything that arrived
        since = time.monotonic() - self._connected_since
        if since < self.cfg.settle_time:
            return
        if not self._was_in_step and since < self.cfg.startup_wait:
            # After a restart, wait (bounded) for every server we knew: one of
            # them may hold a longer log than ours.
            now = time.monotonic()
            alive = {m.node for m in self.members.values() if m.alive(now, PRESENCE_TTL)}
            if self._known - alive - {self.node}:
                return
        now = time.monotonic()
        online = sorted([m.node for m in self.members.values() if m.alive(now, PRESENCE_TTL)]
                        + [self.node])
        if online[0] != self.node:
            return
        self._become_leader()

    def _become_leader(self) -> None:
        log.info("no live sequencer; %s takes over", self.node)
        # Never start a new epoch behind a peer: catch up from the most advanced one.
        top_epoch, best = self.epoch, None
        now = time.monotonic()
        for m in [m for m in self.members.values() if m.alive(now, PRESENCE_TTL) and m.addr]:
            try:
                st = self.peers.status(m.addr, timeout=1.0)
            except Exception as e:
                # It may hold writes we lack (acknowledged by it and the old leader):
                # taking over behind it would discard them.  Ask again on the next
                # tick; a peer that is really gone stops counting as alive when its
                # presence lapses (will, or PRESENCE_TTL).
                log.warning("not taking over yet: live peer %s did not answer status: %s",
                            m.node, e)
                return
            top_epoch = max(top_epoch, st.epoch)
            # The most advanced log: Raft's "up to date" order, epoch first.
            if (st.epoch, st.applied_seq) > (self.epoch, self.applied) and (
                    best is None or (st.epoch, st.applied_seq) > best[2]):
                best = (m.node, st.applied_seq, (st.epoch, st.applied_seq))
        if best is not None:
            self._gap_target = best[1]
            self._resolve_mine(self._repair(best[0]))
            if self.applied < best[1]:
                log.warning("could not catch up with %s; not taking over yet", best[0])
                return
        self.role = Role.LEADER
        self._follower_acks = {}
        self.transport.subscribe(self.t_propose)
        self.transport.subscribe(self.t_ack)
        r = self._publish_batch([{"op": "epoch", "node": self.node}], epoch=top_epoch + 1)
        if r is None:
            return
        self._diverged = False
        self._gap_target, self._pending = 0, {}
        self._announce()
        log.info("sequencer for epoch %d from position %d", self.epoch, self.applied)
        # Our own proposals still waiting go to ourselves now.
        with self._waiting_lock:
            items = [w.item for w in self._waiting.values()]
        for it in items:
            self._events.put(("local", it))

    # ---- timers ------------------------------------------------------------
    def _ticker_loop(self) -> None:
        last_hb = last_announce = 0.0
        while not self._stopping.wait(0.05):
            now = time.monotonic()
            if self.role is Role.LEADER and now - last_hb >= self.cfg.heartbeat_interval:
                last, h = self._published
                self.transport.publish(self.t_log, codec.heartbeat_doc(self.epoch, self.node, last, h),
                                       qos=0)
                last_hb = now
            if not self._tick_queued:
                self._tick_queued = True
                self._events.put(("tick", None))
            if now - last_announce >= PRESENCE_INTERVAL and self.transport.connected:
                self._announce()  # also repairs a stale retained will
                last_announce = now
            self._retry_and_expire()

    def _tick(self) -> list[tuple[str, Outcome]]:
        out: list[tuple[str, Outcome]] = []
        self._maybe_elect()
        if self.role is Role.LEADER:
            self._release_committed()  # a follower may have gone silent
        elif time.monotonic() - self._ack_time > 0.5:
            self._send_ack(again=True)
        if self.role is Role.FOLLOWER and self._leader_alive() and (
                self._diverged or self._gap_target > self.applied):
            out += self._repair(self._claimed or self.leader)
        if self.datadir is not None and self._since_snapshot >= self.cfg.snapshot_every:
            self._write_snapshot()
        return out

    def _update_state(self) -> None:
        if self._diverged:
            st = "diverged"
        elif self.role is Role.LEADER:
            st = "in-step"
        elif not self._leader_alive():
            st = "no-leader" if self._was_in_step else "starting"
        elif self._leader_last > self.applied or self._gap_target > self.applied or self._pending:
            st = "catching-up"
        else:
            st = "in-step"
        if st == "in-step":
            self._was_in_step = True
        if st != self._state:
            log.info("state %s -> %s (position %d)", self._state, st, self.applied)
            self._state = st
            if self._on_state is not None:
                self._on_state(st)
        if st in ("in-step", "no-leader"):
            self._readable.set()
        else:
            self._readable.clear()

    # ---- persistence -----------------------------------------------------------
    def _save_known(self) -> None:
        if self.datadir is not None:
            try:
                self.datadir.save_meta("members", sorted(self._known))
            except Exception as e:
                log.warning("cannot save the member list: %s", e)

    def _recover(self) -> None:
        self._known = set(self.datadir.load_meta("members") or [])
        rec = self.datadir.load()
        for w in rec.warnings:
            log.warning("data dir: %s", w)
        if rec.snapshot is not None:
            s = rec.snapshot
            for key, mx, versions in s.keys:
                self.store.load_key(key, mx, [Version(*v) for v in versions])
            self.applied, self.hash, self.epoch = s.seq, s.chain_hash, s.epoch
            self.leader = s.meta.get("leader", "")
            for i, seq in s.meta.get("ids", []):
                self._recent_ids[i] = seq
        replayed, complete = 0, True
        for first, last, payload in rec.batches:
            try:
                b = codec.decode_batch(payload)
            except BadMessage as e:
                log.warning("data dir: unreadable batch at %d: %s; stopping replay", first, e)
                complete = False
                break
            if b.first != self.applied + 1 or b.prev != self.hash:
                log.warning("data dir: log does not continue at %d; stopping replay", first)
                complete = False
                break
            self._apply_batch(b, persist=False)
            replayed += 1
        if not complete:
            # Rewrite the directory to what was actually loaded; peers supply the rest.
            self.datadir.reset(self._snapshot_state())
        self._leader_seen = 0.0
        log.info("recovered position %d (epoch %d, %d keys, %d batches replayed)",
                 self.applied, self.epoch, len(self.store), replayed)

    def _snapshot_state(self):
        from .persistence import SnapshotState
        with self.store_lock:  # a consistent copy; the file is written outside the lock
            keys = [(k, mx, list(vs)) for k, mx, vs in self.store.dump()]
            return SnapshotState(seq=self.applied, epoch=self.epoch, chain_hash=self.hash,
                                 keys=keys, meta={"node": self.node, "leader": self.leader,
                                                  "ids": list(self._recent_ids.items())[-50_000:]})

    def _write_snapshot(self) -> None:
        """Snapshot in the background; the log keeps appending meanwhile."""
        if self._snapshotting.is_set():
            return
        state = self._snapshot_state()
        self._since_snapshot = 0
        self._snapshotting.set()

        def write():
            try:
                self.datadir.sync()
                self.datadir.write_snapshot(state)
                log.info("snapshot at position %d written", state.seq)
            except Exception:
                log.exception("snapshot failed")
            finally:
                self._snapshotting.clear()

        threading.Thread(target=write, name="kvs-snapshot", daemon=True).start()


def _chunks(items: list[dict], max_items: int, max_bytes: int) -> Iterator[list[dict]]:
    chunk, size = [], 0
    for it in items:
        n = len(it.get("k", "")) + len(it.get("v", "")) + 64
        if chunk and (len(chunk) >= max_items or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += n
    if chunk:
        yield chunk


_garbage_count = 0


def _warn_garbage(where: str, err: Exception, payload) -> None:
    global _garbage_count
    _garbage_count += 1
    if _garbage_count <= 20 or _garbage_count % 1000 == 0:
        log.warning("dropped malformed %s message (%d bytes): %s [%d so far]", where,
                    len(payload) if payload is not None else 0, err, _garbage_count)
