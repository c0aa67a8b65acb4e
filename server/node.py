"""The driver: runs the Raft machine, the MQTT transport, the store and the data
dir on the server's one asyncio loop (the gRPC aio server's).

Every Ready is carried out in this fixed order (etcd's raftNode.start):
  1. send a leader's appends and heartbeats (they depend on nothing unsaved);
  2. persist hard state + entries, fsync (in the persistence thread);
  3. send the other messages (MQTT, to ``kvs/<c>/raft/<node>``): votes and
     acknowledgements only ever leave after what they promise is on disk;
  4. apply committed entries to the store (the Applier);
  5. answer: writes whose changes were applied, linearizable reads, state;
  6. ``machine.advance(ready)``.
While 2 runs, new messages and proposals keep reaching the machine; they make
the next Ready.  Membership, bootstrap and joining are here too: who may join is
decided by the log (CONF entries); when to ask is decided by presence.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import codec, repair
from .applier import Applier, Reader
from .codec import BadMessage
from .peers import PeerClients
from .raft.machine import Machine
from .raft.types import CONF, NORMAL, Config, MsgType, Ready, Role, SnapshotMeta
from .transport import BrokerConfig, MqttTransport
from .waiters import Outcome, Waiters
from .watch import WatchHub

log = logging.getLogger(__name__)

# Leader-only messages that depend on nothing this Ready persists (see _run_ready).
_EARLY = frozenset({MsgType.APP, MsgType.HB, MsgType.SNAP})


@dataclass
class NodeConfig:
    node_id: str
    address: str                       # gRPC host:port peers use to reach us
    cluster: str = "kvs"               # MQTT topic namespace
    write_timeout: float = 10.0        # a write fails (-1) when not applied by then
    tick: float = 0.1                  # seconds per Raft tick
    election_tick: int = 10            # election timeout: 1-2 s
    heartbeat_tick: int = 1
    no_quorum_after: float = 1.0       # writes fail "no quorum" after this long without one
    retry_interval: float = 2.0        # re-propose a change not applied by then (same id)
    settle_time: float = 2.0           # a fresh server listens this long before bootstrap/join
    read_wait: float = 3.0             # a read waits this long for the node to be in step
    presence_interval: float = 1.0
    presence_ttl: float = 10.0
    snapshot_every: int = 50_000       # applied changes between snapshots / log compactions
    keep_entries: int = 5_000          # entries kept behind a compaction for slow followers
    max_batch_items: int = 2_000
    max_batch_bytes: int = 1 << 20
    linearizable_timeout: float = 5.0
    keep_versions: int | None = None   # a leader proposes this retention when it differs
    watch_buffer_bytes: int = 8 << 20  # a live watcher's queue (RESOURCE_EXHAUSTED beyond)
    watch_history: int = 100_000       # recent changes kept for resuming watchers


class NotLeader(Exception):
    def __init__(self, leader: str, addr: str):
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader, self.addr = leader, addr


class Node:
    def __init__(self, cfg: NodeConfig, broker: BrokerConfig, datadir=None,
                 peers: PeerClients | None = None,
                 on_state: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.node = cfg.node_id
        self.datadir = datadir
        self.peers = peers or PeerClients()
        self._on_state = on_state
        self.applier = Applier()
        self.applier.feed = []          # changes applied, for the watch hub
        self.reader = Reader(self.applier)
        self.watch = WatchHub(ring_changes=cfg.watch_history,
                              watcher_bytes=cfg.watch_buffer_bytes)
        self._retention_term = 0        # term in which this leader checked --keep-versions
        self.waiters = Waiters()
        self.boot = os.urandom(4).hex()
        self.cid = ""
        self.started = time.time()
        prefix = f"kvs/{cfg.cluster}"
        self.t_raft, self.t_nodes, self.t_join = f"{prefix}/raft", f"{prefix}/nodes", f"{prefix}/join"
        self.machine: Machine | None = None
        self._broker = broker
        self.transport: MqttTransport | None = None   # made in start(): its will needs our state
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvs-disk")
        self._batch: list[dict] = []
        self._linger: asyncio.TimerHandle | None = None
        self._kicked = False
        self._processing = False
        self._tasks: list[asyncio.Task] = []
        self._presence: dict[str, tuple[codec.Presence, float]] = {}   # node -> (doc, seen)
        self._connected_since = 0.0
        self._no_quorum_since: float | None = None
        self._was_in_step = False
        self._state = "starting"
        self._readable = False
        self._readable_set = asyncio.Event()   # set while _readable: reads waiting wake on it
        self._transfer: asyncio.Task | None = None
        self._snapshotting = threading.Event()
        self._since_snapshot = 0
        self._storage_error = ""
        self._reads: dict[str, asyncio.Future] = {}          # ctx -> future(index)
        self._apply_waits: list[tuple[int, asyncio.Future]] = []
        self._conf_waits: list[tuple[Callable[[], bool], asyncio.Future]] = []
        self._last_join = 0.0
        # A follower is in step once a ReadIndex round (the leader confirmed by a quorum)
        # told it the commit index, and it applied that far -- not merely because it
        # applied what it alone knows to be committed (it may lag after a restart).
        self._synced_term = 0
        self._sync_target = 0
        self._sync_ctx = ""
        self._sync_at = 0.0
        self._behind_since: float | None = None
        self._synced_vote: tuple[int, str] = (0, "")
        self._named: set[str] = set()   # nodes added by membership entries in our log
        self._last_presence = 0.0
        self._stopping = False

    # =====================================================================
    # lifecycle
    # =====================================================================
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        hard, snap, entries = None, SnapshotMeta(), []
        if self.datadir is not None:
            rec = await self._loop.run_in_executor(self._disk, self.datadir.load)
            for w in rec.warnings:
                log.warning("data dir: %s", w)
            meta = self.datadir.load_meta("cluster") or {}
            self.cid = str(meta.get("cid", ""))
            if rec.snapshot is not None:
                s = rec.snapshot
                self.applier.load(s.keys, dict(s.meta, index=s.index, term=s.term))
                snap = SnapshotMeta(s.index, s.term, self.applier.conf)
                self.cid = self.cid or str(s.meta.get("cid", ""))
            hard, entries = rec.hard_state, rec.entries
            self.watch.reset(self.applier.changes, self.applier.compacted)
            self._name_members(entries)
            self._synced_vote = (hard.term, hard.vote)
            log.info("recovered position %d: snapshot at %d, %d log entries after it, term %d,"
                     " commit %d, cluster %s", entries[-1].index if entries else snap.index,
                     snap.index, len(entries), hard.term, hard.commit, self.cid or "(none)")
        rcfg = Config(node=self.node, election_tick=self.cfg.election_tick,
                      heartbeat_tick=self.cfg.heartbeat_tick)
        kwargs = {"snapshot": snap, "entries": entries}
        if hard is not None:
            kwargs["hard_state"] = hard
        self.machine = Machine(rcfg, random.Random(), **kwargs)
        self.transport = MqttTransport(
            self._broker, client_id=f"kvs-{self.cfg.cluster}-{self.node}-{self.boot}",
            on_message=self._on_message, on_connection=self._on_connection,
            will=(f"{self.t_nodes}/{self.node}", self._presence_doc(False)),
            watchdog_topic=f"kvs/{self.cfg.cluster}/ping/{self.node}")
        self.transport.subscribe(f"{self.t_raft}/{self.node}")
        self.transport.subscribe(f"{self.t_nodes}/+")
        self.transport.subscribe(self.t_join)
        self.transport.start()
        self._tasks.append(asyncio.create_task(self._ticker()))
        self._kick()

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self._transfer is not None:
            self._transfer.cancel()
        if self.transport is not None:
            if self.transport.connected:
                self.transport.publish(f"{self.t_nodes}/{self.node}", self._presence_doc(False),
                                       qos=1, retain=True)
            try:
                await self.transport.stop()
            except Exception:
                log.exception("stopping the transport")
        self.waiters.fail_all(Outcome(-1, "server shutting down", settled=False))
        self.watch.close_all(f"server {self.node} is shutting down; resume on another server")
        for fut in list(self._reads.values()):
            if not fut.done():
                fut.set_result(0)
        if self.datadir is not None:
            def close():
                try:
                    self.datadir.sync()
                finally:
                    self.datadir.close()
            try:
                await self._loop.run_in_executor(self._disk, close)
            except Exception as e:
                log.warning("closing the data dir: %s", e)
        self._disk.shutdown(wait=True)
        self.peers.close()

    # =====================================================================
    # writes
    # =====================================================================
    def submit_put(self, key: str, value: str, request_id: str | None = None) -> asyncio.Future:
        return self._submit({"op": "put", "k": key, "v": value}, request_id)

    def submit_del(self, key: str, version: int | None, request_id: str | None = None):
        return self._submit({"op": "del", "k": key,
                             "ver": version if version is not None and version > 0 else None},
                            request_id)

    def submit_compact(self, position: int, request_id: str | None = None) -> asyncio.Future:
        """Compact (admin): drop versions superseded before ``position``, as a log entry."""
        return self._submit({"op": "compact", "pos": position}, request_id)

    def submit_retention(self, keep: int, request_id: str | None = None) -> asyncio.Future:
        """Keep ``keep`` live versions per key (0: all), as a log entry."""
        return self._submit({"op": "retain", "keep": keep}, request_id)

    def _refusal(self) -> str | None:
        if self._storage_error:
            return self._storage_error
        if self._state == "removed":
            return f"server {self.node} was removed from the cluster"
        if self.transport is None or not self.transport.connected:
            return "no quorum: the message broker is unreachable; write not made"
        if self._state == "no-quorum":
            return (f"no quorum: server {self.node} cannot reach a majority of the cluster;"
                    " write not made")
        return None

    def _submit(self, item: dict, request_id: str | None) -> asyncio.Future:
        iid = f"c:{request_id}" if request_id else f"{self.node}:{self.boot}:{next(self._ids)}"
        item["id"], item["node"] = iid, self.node
        if request_id:
            first = self.applier.outcome_of(iid)
            if first is not None:   # a retry of a change already applied here
                fut = self._loop.create_future()
                fut.set_result(first)
                return fut
        refused = self._refusal()
        if refused:
            fut = self._loop.create_future()
            fut.set_result(Outcome(-1, refused, settled=False))
            return fut
        fut, new = self.waiters.register(item, time.monotonic(), self.cfg.write_timeout)
        if new:
            self._batch.append(item)
            self._kick()
        return fut

    def _maybe_flush(self) -> None:
        """Group commit at the leader: while an earlier batch is replicating (appended,
        not yet committed), new changes wait for it -- or for LINGER -- and then travel
        together as one entry.  Otherwise (idle leader, follower) they go at once."""
        if not self._batch:
            return
        m = self.machine
        if m.role is not Role.LEADER or m.commit >= m.last_index or \
                len(self._batch) >= self.cfg.max_batch_items:
            self._flush_proposals()
        elif self._linger is None:
            self._linger = self._loop.call_later(LINGER, self._linger_done)

    def _linger_done(self) -> None:
        self._linger = None
        self._flush_proposals()
        self._kick()

    def _flush_proposals(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._batch:
            return
        items, self._batch = self._batch, []
        now = time.monotonic()
        chunk, size = [], 0
        for it in items:
            n = len(it.get("k") or "") + len(it.get("v") or "") + 64
            if chunk and (len(chunk) >= self.cfg.max_batch_items
                          or size + n > self.cfg.max_batch_bytes):
                self._propose(chunk, size, now)
                chunk, size = [], 0
            chunk.append(it)
            size += n
        if chunk:
            self._propose(chunk, size, now)

    def _propose(self, items: list[dict], size: int, now: float) -> None:
        if self.machine.propose({"ts": time.time(), "items": items}, size):
            self.waiters.proposed((it["id"] for it in items), now)
        # else: no leader now; the ticker proposes again (or fails it: no quorum)

    # =====================================================================
    # reads
    # =====================================================================
    def readable_now(self) -> bool:
        return self._readable

    async def wait_readable(self, timeout: float) -> bool:
        """True once reads may be served, False if that takes over ``timeout``.  A read
        waits on the loop (not in a worker thread: many reads waiting while a node
        catches up must not starve Snapshot and FetchState) and is woken by the state
        change, not by polling."""
        try:
            await asyncio.wait_for(self._readable_set.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._readable

    def unreadable_reason(self) -> str:
        return f"server {self.node} is not in step with the cluster ({self._state})"

    async def read_barrier(self) -> str | None:
        """Raft ReadIndex: returns None once this server has applied everything
        committed before the call, else the reason it cannot tell."""
        if self.machine is None or not self.cid:
            return f"server {self.node} has not joined a cluster"
        ctx = f"{self.boot}:{next(self._ids)}"
        fut = self._loop.create_future()
        self._reads[ctx] = fut
        self.machine.read_index(ctx)
        self._kick()
        try:
            index = await asyncio.wait_for(fut, self.cfg.linearizable_timeout)
        except asyncio.TimeoutError:
            return "no quorum: could not confirm leadership for a linearizable read"
        finally:
            self._reads.pop(ctx, None)
        if index <= 0:
            return "no quorum: no leader to confirm a linearizable read"
        if not await self._applied(index, self.cfg.linearizable_timeout):
            return f"server {self.node} did not apply up to {index} in time"
        return None

    def session_position(self) -> str:
        """``<cluster id>/<applied position>``: what a client's later read may wait for
        (``kvs-position``); empty before this server joined a cluster."""
        return f"{self.cid}/{self.applier.index}" if self.cid else ""

    async def caught_up(self, cid: str, position: int) -> str | None:
        """None once this server has applied ``position`` of cluster ``cid`` (at once
        for another cluster's position: it orders nothing here), else, after
        ``read_wait``, the reason."""
        if not self.cid or cid != self.cid or await self._applied(position, self.cfg.read_wait):
            return None
        return (f"server {self.node} has applied up to {self.applier.index}, not yet position "
                f"{position} that this client has already seen")

    async def _applied(self, index: int, timeout: float) -> bool:
        """Waits until this server has applied ``index``: False after ``timeout``."""
        if self.applier.index >= index:
            return True
        w = self._loop.create_future()
        self._apply_waits.append((index, w))
        try:
            await asyncio.wait_for(w, timeout)
            return True
        except asyncio.TimeoutError:
            # forget it now: a client may name a position this server never reaches
            self._apply_waits = [(i, f) for i, f in self._apply_waits if f is not w]
            return False

    # =====================================================================
    # the Ready loop
    # =====================================================================
    def _kick(self) -> None:
        if not self._kicked and self._loop is not None:
            self._kicked = True
            self._loop.call_soon(self._process_soon)

    def _process_soon(self) -> None:
        self._kicked = False
        if self.machine is None or self._stopping:
            return
        if self._processing:
            return   # the running Ready loop flushes proposals once per cycle (group commit)
        self._maybe_flush()
        if self.machine.has_ready():
            self._processing = True
            self._tasks.append(asyncio.create_task(self._run_ready()))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _run_ready(self) -> None:
        try:
            while self.machine.has_ready() and not self._stopping:
                rd = self.machine.ready()
                # 1. a leader's appends and heartbeats go out before its own fsync, so the
                #    followers' disk writes overlap the leader's (Raft thesis §10.2.1, etcd's
                #    raftNode): the leader counts its own copy only after advance().
                later = []
                encoded: dict = {}   # entries sent to several followers are encoded once
                for m in rd.messages:
                    if m.type in _EARLY:
                        self._send(m, encoded)
                    else:
                        later.append(m)
                # 2. persist before anything that depends on it leaves this node (votes,
                #    acknowledgements of appended entries), in the persistence thread; fsync
                #    only when entries, the term or the vote changed (a new commit index
                #    alone need not be durable: etcd's MustSync).
                self._name_members(rd.entries)
                if self.datadir is not None and (rd.entries or rd.hard_state is not None):
                    try:
                        if rd.entries or self._vote_changed(rd.hard_state):
                            await self._loop.run_in_executor(self._disk, self._persist, rd)
                        else:   # a new commit index only: a small buffered record
                            self.datadir.append(rd.entries, rd.hard_state)
                    except Exception as e:
                        self._fail_stop(e)
                        return
                # 3. send the rest
                for m in later:
                    self._send(m, encoded)
                # 4. apply, 5. answer
                if rd.committed:
                    self._apply(rd)
                for rs in rd.read_states:
                    if rs.ctx == self._sync_ctx:
                        self._sync_ctx = ""
                        if rs.index > 0:
                            self._synced_term, self._sync_target = self.machine.term, rs.index
                        continue
                    fut = self._reads.get(rs.ctx)
                    if fut is not None and not fut.done():
                        fut.set_result(rs.index)
                if rd.fetch_snapshot is not None and self._transfer is None:
                    self._transfer = asyncio.create_task(self._install_snapshot(rd.fetch_snapshot))
                # 5.
                self.machine.advance(rd)
                if rd.soft_state is not None:
                    log.info("raft: %s in term %d (leader %s)", rd.soft_state.role.value,
                             rd.soft_state.term, rd.soft_state.leader or "unknown")
                    self._update_state()
                self._maybe_flush()
        except Exception:
            log.exception("error handling a Ready")
        finally:
            self._processing = False
        if self.machine.has_ready() and not self._stopping:
            self._kick()

    def _persist(self, rd: Ready) -> None:   # persistence thread
        self.datadir.append(rd.entries, rd.hard_state)
        self.datadir.sync()

    def _send(self, m, encoded: dict) -> None:
        raw = None
        if m.entries and m.entries[0].index:   # (a forwarded proposal has no index yet)
            # Within one Ready the same index range holds the same entries.
            span = (m.entries[0].index, m.entries[-1].index, m.entries[-1].term)
            raw = encoded.get(span)
            if raw is None:
                raw = encoded[span] = codec.encode_entries(m.entries)
        self.transport.publish(f"{self.t_raft}/{m.to}", codec.encode_raft(self.cid, m, raw))

    def _vote_changed(self, hs) -> bool:
        if hs is None:
            return False
        changed = (hs.term, hs.vote) != self._synced_vote
        self._synced_vote = (hs.term, hs.vote)
        return changed

    def _fail_stop(self, e: Exception) -> None:
        log.critical("cannot make changes durable: %s; refusing writes", e)
        self._storage_error = f"storage failure on {self.node}: {e}"
        self.waiters.fail_all(Outcome(-1, self._storage_error, settled=False))
        self._stopping = True   # this node takes no further part in the protocol
        self._update_state()

    def _apply(self, rd: Ready) -> None:
        conf_changed = False
        for e in rd.committed:
            if e.index <= self.applier.index:
                continue   # already in the store (a snapshot covered it)
            for iid, outcome in self.applier.apply(e):
                self.waiters.trigger(iid, outcome)
            if e.kind == CONF:
                conf_changed = True
                log.info("membership at %d: %s -> voters %s, learners %s", e.index, e.data,
                         sorted(self.applier.conf.voters), sorted(self.applier.conf.learners))
            # changes, not entries: an entry of a busy leader carries hundreds of them
            items = e.data.get("items", ()) if e.kind == NORMAL and e.data else ()
            self._since_snapshot += max(1, len(items))
        if rd.committed:
            a = self.applier
            self.watch.publish(a.take_changes(), a.changes, a.compacted)
        if self._apply_waits:
            done = [(i, f) for i, f in self._apply_waits if i <= self.applier.index]
            self._apply_waits = [(i, f) for i, f in self._apply_waits if i > self.applier.index]
            for _, f in done:
                if not f.done():
                    f.set_result(True)
        if conf_changed:
            self._conf_applied()
        if self._since_snapshot >= self.cfg.snapshot_every:
            self._snapshot()
        self._update_state()

    def _conf_applied(self) -> None:
        if self.node not in self.machine.conf.members() and self.machine.conf.voters:
            if self._state != "removed":
                log.warning("this server was removed from the cluster")
        waits, self._conf_waits = self._conf_waits, []
        for pred, fut in waits:
            if pred():
                if not fut.done():
                    fut.set_result(None)
            else:
                self._conf_waits.append((pred, fut))
        if self.datadir is not None and self.cid:
            self._save_cluster_meta()

    # =====================================================================
    # snapshots, compaction and state transfer
    # =====================================================================
    def _snapshot_meta(self) -> dict:
        return dict(self.applier.meta(), cid=self.cid, node=self.node)

    def _keep_from(self, index: int) -> int:
        """First index kept behind a compaction at ``index``: ``keep_entries`` entries for
        slow followers, but no more than KEEP_BYTES of them (batches can be large)."""
        lo = max(self.machine.first_index, index - self.cfg.keep_entries)
        size = 0
        for e in reversed(self.machine.log.slice(lo, index)):
            size += e.size
            if size > KEEP_BYTES:
                return e.index + 1
        return max(0, index - self.cfg.keep_entries)

    def _snapshot(self) -> None:
        self._since_snapshot = 0
        index = self.applier.index
        keep_from = self._keep_from(index)
        if self.datadir is None:
            if keep_from > self.machine.first_index:
                self.machine.compact(keep_from)
            return
        if self._snapshotting.is_set():
            return
        from .persistence import SnapshotState
        state = SnapshotState(index=index, term=self.applier.term,
                              keys=self.applier.copy_keys(), meta=self._snapshot_meta())
        self._snapshotting.set()

        def write():
            try:
                self.datadir.write_snapshot(state)
                log.info("snapshot at index %d written", state.index)
                return True
            except Exception:
                log.exception("snapshot failed")
                return False
            finally:
                self._snapshotting.clear()

        async def run():
            ok = await asyncio.to_thread(write)
            if ok and keep_from > self.machine.first_index and keep_from <= self.machine.applied:
                self.machine.compact(keep_from)
        self._tasks.append(asyncio.create_task(run()))

    def export_state(self) -> Iterator[bytes]:
        """A consistent copy of the whole state at one applied index (any thread: the
        copy is taken under the applier's lock; chunks are encoded as iterated).
        """
        meta, keys = self.applier.export()
        header = {"cid": self.cid, "index": meta["index"], "term": meta["term"],
                  "conf": meta["conf"], "meta": meta, "leader": self.machine.leader}
        return repair.export_chunks(header, keys)

    async def _install_snapshot(self, req) -> None:
        try:
            addr = self.machine.conf.addr(req.frm) or self._presence_addr(req.frm)
            if not addr:
                log.warning("state transfer: no address for %s", req.frm)
                return
            log.warning("state transfer from %s (%s), at least index %d", req.frm, addr, req.index)
            started = time.monotonic()
            state = await asyncio.to_thread(lambda: repair.receive(self.peers.fetch_state(addr)))
            if state.cid != self.cid:
                raise BadMessage(f"state of cluster {state.cid!r}, not ours ({self.cid!r})")
            if state.index <= self.applier.index:
                log.info("state transfer at %d is not newer than ours (%d)", state.index,
                         self.applier.index)
                return
            meta = dict(state.meta, index=state.index, term=state.term)
            if self.datadir is not None and self.machine.term_at(state.index) != state.term:
                # Our log does not hold that entry: the transferred state replaces it.
                from .persistence import SnapshotState
                from .raft.types import HardState
                snap = SnapshotState(index=state.index, term=state.term, keys=state.keys,
                                     meta=dict(meta, cid=self.cid, node=self.node))
                hard = HardState(self.machine.term, self.machine.vote, state.index)
                await self._loop.run_in_executor(self._disk, self.datadir.reset, snap, hard)
            self.applier.install(state.store, meta)
            self.watch.reset(self.applier.changes, self.applier.compacted)
            self.machine.restore(SnapshotMeta(state.index, state.term, state.conf))
            self._since_snapshot = 0
            # Our writes that the transfer covered: their outcome is in the id table.
            for w in list(self.waiters):
                o = self.applier.outcome_of(w.item["id"])
                if o is not None:
                    self.waiters.trigger(w.item["id"], o)
            log.warning("state transfer done: %d keys at index %d in %.2fs", len(state.keys),
                        state.index, time.monotonic() - started)
            self._kick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("state transfer from %s failed: %s", req.frm, e)
        finally:
            self._transfer = None
            self._update_state()

    # =====================================================================
    # MQTT (on the loop)
    # =====================================================================
    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.machine is None:
            return
        if topic.startswith(self.t_raft + "/"):
            try:
                cid, m = codec.decode_raft(payload)
            except BadMessage as e:
                _warn("raft message", e, payload)
                return
            if cid != self.cid or not cid or m.to != self.node:
                _warn("raft message", BadMessage(
                    f"for cluster {cid!r} / node {m.to!r}, we are {self.cid!r} / {self.node!r}"),
                    payload)
                return
            why = self._suspect(m)
            if why:
                _warn("raft message", BadMessage(why), payload)
                return
            if m.type is MsgType.PROP and not _fresh(m.entries):
                _warn("raft message", BadMessage("proposal older than "
                                                  f"{PROPOSAL_MAX_AGE:g}s (a replay?)"), payload)
                return
            self.machine.step(m)
            self._kick()
        elif topic.startswith(self.t_nodes + "/"):
            try:
                p = codec.decode_presence(payload)
            except BadMessage as e:
                _warn("presence", e, payload)
                return
            if p.node != self.node and topic == f"{self.t_nodes}/{p.node}":
                self._presence[p.node] = (p, time.monotonic())
        elif topic == self.t_join:
            try:
                j = codec.decode_join(payload)
            except BadMessage as e:
                _warn("join request", e, payload)
                return
            self._handle_join(j)

    def _suspect(self, m) -> str:
        """Why a well-formed message for us must still be dropped ("" if it need not).
        Senders must be members (applied, or named by a membership entry in our log, or
        online with our cluster id); a server that has no configuration yet (joining) has
        to listen to whoever leads.  A term far beyond ours is refused: terms only grow by
        elections, and one near the integer limit would wedge every election after it.
        (Without the cluster secret this keeps out strangers, not impersonators.)"""
        mc = self.machine
        if m.term > mc.term + MAX_TERM_JUMP:
            return f"term {m.term} is absurdly far beyond ours ({mc.term})"
        if not mc.conf.voters or m.frm in mc.conf.members() or m.frm in self._named:
            return ""
        p = self._presence.get(m.frm)
        if p is not None and p[0].cid == self.cid and p[0].online and \
                time.monotonic() - p[1] < self.cfg.presence_ttl:
            return ""
        return f"sender {m.frm!r} is not a member"

    def _name_members(self, entries) -> None:
        for e in entries:
            if e.kind == CONF and e.data:
                if e.data.get("op") == "bootstrap":
                    self._named.update(n for n, _ in e.data.get("voters", []))
                elif e.data.get("op") in ("add_learner", "promote"):
                    self._named.add(e.data.get("node", ""))
                elif e.data.get("op") == "remove":
                    self._named.discard(e.data.get("node", ""))

    def _on_connection(self, up: bool) -> None:
        if up:
            self._connected_since = time.monotonic()
            self._announce()
        self._update_state()

    def _presence_doc(self, online: bool) -> bytes:
        m = self.machine
        return codec.presence_doc(
            node=self.node, addr=self.cfg.address, online=online, boot=self.boot, cid=self.cid,
            term=m.term if m else 0, applied=self.applier.index,
            role=self._role_name() if m else "")

    def _announce(self) -> None:
        self._last_presence = time.monotonic()
        self.transport.publish(f"{self.t_nodes}/{self.node}", self._presence_doc(True),
                               qos=1, retain=True)

    def _presence_addr(self, node: str) -> str:
        p = self._presence.get(node)
        return p[0].addr if p else ""

    def _alive(self, now: float) -> dict[str, codec.Presence]:
        return {n: p for n, (p, seen) in self._presence.items()
                if p.online and now - seen < self.cfg.presence_ttl}

    # =====================================================================
    # membership: bootstrap, join, remove
    # =====================================================================
    def _bootstrap_or_join(self, now: float) -> None:
        """A server without a cluster: join the one whose servers are online, or --
        when there is none -- the smallest id among the fresh servers online
        bootstraps a cluster of one (the others then join it)."""
        if not self.transport.connected or now - self._connected_since < self.cfg.settle_time:
            return
        alive = self._alive(now)
        cids: dict[str, int] = {}
        for p in alive.values():
            if p.cid:
                cids[p.cid] = cids.get(p.cid, 0) + 1
        if cids:
            cid = max(sorted(cids), key=lambda c: cids[c])
            if len(cids) > 1:
                log.warning("servers of several clusters on this broker topic: %s; joining %s",
                            sorted(cids), cid)
            self.cid = cid
            log.info("joining cluster %s", cid)
        else:
            fresh = sorted([n for n, p in alive.items() if not p.cid] + [self.node])
            if fresh[0] != self.node:
                return   # the smallest fresh server bootstraps; we join it
            self.cid = os.urandom(8).hex()
            log.info("bootstrapping cluster %s with %s as its only voter", self.cid, self.node)
            self.machine.bootstrap({self.node: self.cfg.address})
        if self.datadir is not None:
            self._save_cluster_meta()
        self._announce()
        self._kick()

    def _save_cluster_meta(self) -> None:
        try:
            self.datadir.save_meta("cluster", {"cid": self.cid, "node": self.node})
        except Exception as e:
            log.warning("cannot save the cluster id: %s", e)

    def _ask_to_join(self, now: float) -> None:
        if now - self._last_join >= 1.0 and self.transport.connected:
            self._last_join = now
            self.transport.publish(self.t_join, codec.join_doc(
                node=self.node, addr=self.cfg.address, boot=self.boot, cid=self.cid, ts=time.time()))

    def _handle_join(self, j) -> None:
        m = self.machine
        if j.cid != self.cid or m.role is not Role.LEADER or j.node == self.node:
            return
        if j.node in m.conf.members() or m.pending_conf():
            return
        err = m.propose_conf("add_learner", j.node, j.addr)
        if err is None:
            log.info("adding %s (%s) as a learner", j.node, j.addr)
            self._kick()

    async def remove_member(self, node_id: str, timeout: float = 10.0) -> None:
        """Leader only (NotLeader otherwise): remove ``node_id``; returns once applied.
        Raises ValueError with the reason when the machine refuses."""
        m = self.machine
        if m.role is not Role.LEADER:
            raise NotLeader(m.leader, m.conf.addr(m.leader) or self._presence_addr(m.leader))
        err = m.propose_conf("remove", node_id)
        if err is not None:
            raise ValueError(err)
        fut = self._loop.create_future()
        self._conf_waits.append((lambda: node_id not in self.machine.conf.members(), fut))
        self._kick()
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ValueError(f"removal of {node_id} not committed within {timeout:g}s") from None

    def members(self) -> list[dict]:
        m = self.machine
        now = time.monotonic()
        alive = self._alive(now)
        progress = m.progress() if m.role is Role.LEADER else {}
        out = []
        for n in sorted(m.conf.members()):
            out.append({"node_id": n, "address": m.conf.addr(n) or self._presence_addr(n),
                        "role": "voter" if n in m.conf.voters else "learner",
                        "online": n == self.node and self.transport.connected or n in alive,
                        "match_index": (m.last_index if n == self.node and m.role is Role.LEADER
                                        else progress.get(n, (0, 0, ""))[0]),
                        "leader": n == m.leader})
        return out

    # =====================================================================
    # timers and state
    # =====================================================================
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick)
            try:
                self._on_tick()
            except Exception:
                log.exception("error in periodic work")

    def _on_tick(self) -> None:
        now = time.monotonic()
        m = self.machine
        if self._stopping:
            return
        m.tick()
        if not self.cid:
            self._bootstrap_or_join(now)
        elif self.node not in m.conf.members() and not m.conf.voters:
            self._ask_to_join(now)
        if now - self._last_presence >= self.cfg.presence_interval and self.transport.connected:
            self._announce()
        # Changes not applied after retry_interval: propose again (same id; the applier
        # applies an id once), e.g. a forward lost with a leader change.
        due = self.waiters.due(now, self.cfg.retry_interval)
        if due and m.leader:
            queued = {it["id"] for it in self._batch}
            self._batch.extend(w.item for w in due if w.item["id"] not in queued)
        self._check_quorum(now)
        if self._sync_ctx and now - self._sync_at > 2.0:
            self._sync_ctx = ""   # its answer was lost; ask again
        if (m.leader and m.role is not Role.LEADER and self._synced_term != m.term
                and not self._sync_ctx and self.node in m.conf.members()):
            self._sync_ctx, self._sync_at = f"sync:{self.boot}:{next(self._ids)}", now
            m.read_index(self._sync_ctx)
        self.waiters.expire(now, Outcome(
            -1, f"change not committed within {self.cfg.write_timeout:g}s; it may still be"
                " applied later", settled=False))
        self._update_state()
        self._kick()

    def _has_quorum(self) -> bool:
        m = self.machine
        if not self.transport.connected or not m.leader:
            return False
        return m.role is not Role.LEADER or m.quorum_active()

    def _check_quorum(self, now: float) -> None:
        if self._has_quorum() or not self.cid:
            self._no_quorum_since = None
            return
        if self._no_quorum_since is None:
            self._no_quorum_since = now
        elif now - self._no_quorum_since >= self.cfg.no_quorum_after:
            n = self.waiters.fail_all(Outcome(
                -1, f"no quorum: server {self.node} cannot reach a majority of the cluster"
                    " (no leader); write not made or outcome unknown", settled=False))
            if n:
                log.warning("failed %d waiting writes: no quorum", n)

    def _role_name(self) -> str:
        m = self.machine
        if m.role is Role.FOLLOWER and self.node in m.conf.learners:
            return "learner"
        return m.role.value

    def _compute_state(self) -> str:
        m = self.machine
        if self._storage_error:
            return "failed"
        if not self.cid:
            return "starting"
        if self.node not in m.conf.members():
            return "removed" if m.conf.voters and self._was_in_step else "joining"
        if self._transfer is not None:
            return "catching-up"
        if self._no_quorum_since is not None and \
                time.monotonic() - self._no_quorum_since >= self.cfg.no_quorum_after:
            return "no-quorum" if self._was_in_step else "starting"
        target = m.commit if m.role is Role.LEADER else max(m.commit, self._sync_target)
        synced = m.role is Role.LEADER or (m.leader and self._synced_term == m.term)
        # Entries known committed but not applied yet for a moment are normal under load
        # (the next Ready applies them): only a lag that lasts means catching up.
        now = time.monotonic()
        if self.applier.index >= target:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = now
        lagging = self._behind_since is not None and (
            now - self._behind_since > 0.5 or not self._was_in_step)
        return "in-step" if synced and not lagging else "catching-up"

    def _update_state(self) -> None:
        if self.machine is None:
            return
        st = self._compute_state()
        if st == "in-step":
            self._was_in_step = True
        self._readable = st in ("in-step", "no-quorum")
        if self._readable:
            self._readable_set.set()
        else:
            self._readable_set.clear()
        if st == "in-step" and self.cfg.keep_versions is not None:
            self._check_retention()
        if st != self._state:
            log.info("state %s -> %s (applied %d, commit %d, term %d)", self._state, st,
                     self.applier.index, self.machine.commit, self.machine.term)
            self._state = st
            if self._on_state is not None:
                self._on_state(st)

    def _check_retention(self) -> None:
        """--keep-versions: a leader in step proposes its policy once per term when the
        replicated one differs (as etcd's auto-compaction runs on the leader)."""
        m = self.machine
        if m.role is not Role.LEADER or self._retention_term == m.term:
            return
        self._retention_term = m.term
        if self.applier.keep != self.cfg.keep_versions:
            log.info("retention: proposing keep-versions %d (cluster has %d)",
                     self.cfg.keep_versions, self.applier.keep)
            self.submit_retention(self.cfg.keep_versions)

    def retention(self) -> dict:
        a = self.applier
        return {"keep_versions": a.keep, "compacted": a.compacted, "position": a.changes,
                "oldest_watch": self.watch.oldest()}

    @property
    def state(self) -> str:
        return self._state

    def status(self) -> dict:
        m = self.machine
        members = self.members()
        alive = self._alive(time.monotonic())
        return {
            "node_id": self.node, "address": self.cfg.address,
            "broker_connected": self.transport.connected,
            "applied_seq": self.applier.index, "epoch": m.term, "leader": m.leader,
            "state": self._state, "keys": self.reader.count(), "log_hash": "",
            "leader_seq": m.commit, "uptime": time.time() - self.started,
            "durable": self.datadir is not None, "snapshotting": self._snapshotting.is_set(),
            "role": self._role_name(), "term": m.term,
            "commit_index": m.commit, "applied_index": self.applier.index,
            "cluster_id": self.cid, "members": members,
            "peers": [(n, p.addr, True) for n, p in sorted(alive.items())],
        }


# A forwarded proposal older than this is refused: its change ids may have left the
# applier's de-duplication window, so a replay (recorded with its MAC) must not apply again.
PROPOSAL_MAX_AGE = 120.0
LINGER = 0.002   # s a leader holds new changes back while an earlier batch replicates
MAX_TERM_JUMP = 1_000_000
KEEP_BYTES = 64 << 20   # of entries kept in memory behind a log compaction


def _fresh(entries) -> bool:
    now = time.time()
    return all(abs(now - (e.data or {}).get("ts", 0.0)) <= PROPOSAL_MAX_AGE
               for e in entries if e.kind == "normal")


_garbage = 0


def _warn(where: str, err: Exception, payload) -> None:
    global _garbage
    _garbage += 1
    if _garbage <= 20 or _garbage % 1000 == 0:
        log.warning("dropped %s (%d bytes): %s [%d so far]", where,
                    len(payload) if payload is not None else 0, err, _garbage)
