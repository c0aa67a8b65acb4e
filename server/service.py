"""gRPC servicers (grpc.aio): validate, propose through the node, read the store, map results.

Nothing here mutates the store.  Every handler catches everything: an
invalid request or an internal error is answered with -1 / a blank Tupla and
the reason in the ``kvs-error`` trailing metadata, never with an exception
escaping to grpc (except RESOURCE_EXHAUSTED, which grpc raises itself).

Handlers are coroutines on the server's one loop, the same loop that runs the
Raft driver, so a write costs no thread hand-off and a read of one key needs no
lock (only the loop mutates the store).  Whole-store copies (Snapshot, a state
export) run in a worker thread under the applier's lock.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import re

import grpc

from kvs_common import wire
from kvs_proto import kvs_pb2, kvs_pb2_grpc

from .applier import HISTORY_DEFAULT, HISTORY_MAX
from .auth import OPEN_AUTHORITY, READ, WRITE, Authority
from .node import Node, NotLeader
from .store import INT32_MAX, InvalidInput, check_key, check_value
from .waiters import Outcome
from .watch import WatchError, encode_head

EXPORT_CHUNK_BYTES = 1024 * 1024

log = logging.getLogger(__name__)

ERROR_KEY = wire.ERROR
NODE_KEY = wire.NODE
REQUEST_ID_KEY = wire.REQUEST_ID           # a client's idempotency key for a write
CONSISTENCY_KEY = wire.CONSISTENCY         # "linearizable": Raft ReadIndex before reading
POSITION_KEY = wire.POSITION               # trailing: "<cluster id>/<applied position>"
AFTER_KEY = wire.AFTER                     # a read waits until this server applied that far
_POSITION = re.compile(r"([!-~]{1,128})/([0-9]{1,18})")  # any cluster id a server gives
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
STREAM_WINDOW = 512     # changes of one stream in flight at once (flow control)
MAX_STREAM_ERRORS = 5   # reasons reported per stream


def _version_arg(msg) -> int | None:
    """SPEC: "no version" is an absent field or one <= 0."""
    return msg.versao if msg.HasField("versao") and msg.versao > 0 else None


def _blank(key: str) -> kvs_pb2.Tupla:
    return kvs_pb2.Tupla(chave=key, valor="", versao=0)


def request_id(context) -> str | None:
    """The call's ``kvs-request-id``: None when absent; InvalidInput when malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
                raise InvalidInput(f"{REQUEST_ID_KEY} must be 8-64 characters of"
                                   " A-Z a-z 0-9 _ -")
            return value
    return None


def linearizable(context) -> bool:
    """The call asked for ``kvs-consistency: linearizable`` (anything else: local)."""
    for key, value in context.invocation_metadata() or ():
        if key == CONSISTENCY_KEY:
            return value == wire.LINEARIZABLE
    return False


def session_after(context) -> tuple[str, int] | None:
    """The call's ``kvs-after`` (cluster id, position): None when absent; InvalidInput
    when malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == AFTER_KEY:
            m = _POSITION.fullmatch(value) if isinstance(value, str) else None
            if m is None:
                raise InvalidInput(f"{AFTER_KEY} must be <cluster id>/<position>, as a"
                                   f" {POSITION_KEY} answer gave it")
            return m.group(1), int(m.group(2))
    return None


def has_after(context) -> bool:
    """The call carries ``kvs-after`` (well-formed or not)."""
    return any(key == AFTER_KEY for key, _ in context.invocation_metadata() or ())


async def _require(auth: Authority, context, access: str, key: str) -> None:
    """Ends the call with PERMISSION_DENIED unless the caller may ``access`` ``key``."""
    reason = auth.denied(access, key)
    if reason is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)


async def unreadable(node: Node) -> str | None:
    """None when reads may be served; else, after waiting up to ``read_wait`` for
    the node to get in step, the reason."""
    if node.readable_now() or await node.wait_readable(node.cfg.read_wait):
        return None
    return node.unreadable_reason()


async def read_gate(node: Node, context) -> str | None:
    """None when this call may read; else the reason.  Linearizable calls first
    confirm with the leader (ReadIndex) and wait until this server applied that far;
    a call with ``kvs-after`` waits until this server applied the position it names
    (a client's session guarantees when it balances over several servers)."""
    reason = await unreadable(node)
    if reason is None and linearizable(context):
        reason = await node.read_barrier()
    if reason is None:
        try:
            after = session_after(context)
        except InvalidInput as e:
            return str(e)
        if after is not None:
            reason = await node.caught_up(*after)
    return reason


class _Denied:
    """A stream item the caller may not write: the stream ends there."""
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class _Errors:
    """Collects reasons and sends them once, as trailing metadata, together with
    the node that answered (``kvs-node``) and its applied position
    (``kvs-position``): both matter when a client balances over several servers."""

    server: Node | None = None

    __slots__ = ("context", "reasons")

    def __init__(self, context):
        self.context = context
        self.reasons: list[str] = []

    def add(self, reason: str, index: int | None = None) -> None:
        if len(self.reasons) < MAX_STREAM_ERRORS:
            self.reasons.append(reason if index is None else f"#{index}: {reason}")

    def send(self) -> None:
        md = [(NODE_KEY, self.server.node if self.server else "")]
        position = self.server.session_position() if self.server else ""
        if position:
            md.append((POSITION_KEY, position))
        if self.reasons:
            # Metadata values must be ASCII-safe; keep the text readable.
            text = "; ".join(self.reasons).encode("ascii", "backslashreplace").decode("ascii")
            md.append((ERROR_KEY, text[:4000]))
        self.context.set_trailing_metadata(md)


class KVSServicer(kvs_pb2_grpc.KVSServicer):
    def __init__(self, node: Node, write_timeout: float,
                 max_key_len: int | None = None, max_value_len: int | None = None,
                 auth: Authority = OPEN_AUTHORITY):
        self.log = node
        self.auth = auth
        _Errors.server = node
        self.write_timeout = write_timeout
        self.max_key_len = max_key_len
        self.max_value_len = max_value_len

    # ---- single operations -------------------------------------------------
    def _start_put(self, req, rid: str | None):
        """The log's future for this change, or the Outcome of a rejected request.
        ``rid``: the request id of this change, if the client gave one."""
        try:
            check_key(req.chave, self.max_key_len)
            check_value(req.valor, self.max_value_len)
        except InvalidInput as e:
            return Outcome(-1, str(e))
        return self.log.submit_put(req.chave, req.valor, rid)

    def _start_del(self, req, rid: str | None):
        try:
            check_key(req.chave, self.max_key_len)
        except InvalidInput as e:
            return Outcome(-1, str(e))
        return self.log.submit_del(req.chave, _version_arg(req), rid)

    @staticmethod
    async def _finish(started) -> Outcome:
        # The log resolves every future within its write timeout (an expired
        # change gets -1 and the reason), so no timer per call is needed here.
        if isinstance(started, Outcome):
            return started
        try:
            return await started
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - defensive
            log.exception("write failed")
            return Outcome(-1, f"internal error: {e}")

    async def _read_gate(self, context) -> str | None:
        return await read_gate(self.log, context)

    async def _lookup(self, req, gate: str | None) -> tuple[kvs_pb2.Tupla, str]:
        try:
            check_key(req.chave, self.max_key_len)
        except InvalidInput as e:
            return _blank(req.chave), str(e)
        if gate is not None:
            return _blank(req.chave), gate
        found = self.log.reader.get(req.chave, _version_arg(req))
        if found is None:
            return _blank(req.chave), ""
        return kvs_pb2.Tupla(chave=req.chave, valor=found.value, versao=found.number), ""

    async def Insere(self, request, context):
        await _require(self.auth, context, WRITE, request.chave)
        return await self._unary(context, self._start_put, request)

    async def Remove(self, request, context):
        await _require(self.auth, context, WRITE, request.chave)
        return await self._unary(context, self._start_del, request)

    async def _unary(self, context, start, request) -> kvs_pb2.Versao:
        errors = _Errors(context)
        try:
            out = await self._finish(start(request, request_id(context)))
        except InvalidInput as e:
            out = Outcome(-1, str(e))
        except Exception as e:
            log.exception("unexpected error")
            out = Outcome(-1, f"internal error: {e}")
        if out.version < 0:
            errors.add(out.reason or "failed")
        errors.send()
        return kvs_pb2.Versao(versao=out.version)

    async def Consulta(self, request, context):
        await _require(self.auth, context, READ, request.chave)
        errors = _Errors(context)
        try:
            tupla, reason = await self._lookup(request, await self._read_gate(context))
        except Exception as e:
            log.exception("unexpected error")
            tupla, reason = _blank(request.chave), f"internal error: {e}"
        if reason:
            errors.add(reason)
        errors.send()
        return tupla

    # ---- streams: one reply per request, in order, pipelined ------------------
    async def InsereVarias(self, request_iterator, context):
        async for reply in self._pipelined(request_iterator, context, self._start_put):
            yield reply

    async def RemoveVarias(self, request_iterator, context):
        async for reply in self._pipelined(request_iterator, context, self._start_del):
            yield reply

    async def _pipelined(self, requests, context, start):
        """Submits while earlier changes are still replicating; a bounded
        window keeps one client from queueing unbounded work."""
        errors = _Errors(context)
        try:
            rid = request_id(context)  # the i-th change of the stream gets "<rid>.<i>"
        except InvalidInput as e:
            rid, rejected = None, Outcome(-1, str(e))
            start = lambda req, rid: rejected  # noqa: E731 - every change answers -1
        window = asyncio.Semaphore(STREAM_WINDOW)
        started: asyncio.Queue = asyncio.Queue()
        done = object()

        async def reader():
            n = 0
            try:
                async for req in requests:
                    reason = self.auth.denied(WRITE, req.chave)
                    if reason is not None:   # earlier changes stand; nothing after is read
                        started.put_nowait(_Denied(reason))
                        return
                    await window.acquire()
                    try:
                        started.put_nowait(start(req, rid and f"{rid}.{n}"))
                    except Exception as e:
                        log.exception("unexpected error")
                        started.put_nowait(Outcome(-1, f"internal error: {e}"))
                    n += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # client went away or sent garbage
                started.put_nowait(e)
            started.put_nowait(done)

        reading = asyncio.create_task(reader())
        index = 0
        try:
            while True:
                item = await started.get()
                if item is done:
                    break
                if isinstance(item, _Denied):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, item.reason)
                if isinstance(item, Exception):
                    if not isinstance(item, grpc.RpcError):
                        errors.add(f"stream error: {item}")
                    break
                out = await self._finish(item)
                window.release()
                if out.version < 0:
                    errors.add(out.reason or "failed", index)
                index += 1
                yield kvs_pb2.Versao(versao=out.version)
        finally:
            reading.cancel()
            errors.send()

    async def ConsultaVarias(self, request_iterator, context):
        errors = _Errors(context)
        index = 0
        try:
            # One gate per stream: linearizable as of the stream's start.
            gate = await self._read_gate(context)
            async for req in request_iterator:
                await _require(self.auth, context, READ, req.chave)
                try:
                    tupla, reason = await self._lookup(req, gate)
                except Exception as e:
                    log.exception("unexpected error")
                    tupla, reason = _blank(req.chave), f"internal error: {e}"
                if reason:
                    errors.add(reason, index)
                index += 1
                yield tupla
        finally:
            errors.send()

    async def Snapshot(self, request, context):
        errors = _Errors(context)
        try:
            reason = await self._read_gate(context)
            if reason is not None:
                errors.add(reason)
                yield _blank("")
                return
            version = request.versao if request.versao > 0 else None
            readable = self.auth.read_filter()
            # One consistent cut, taken off the loop (100k keys take a while).
            rows = await asyncio.to_thread(self.log.reader.snapshot_rows, version)
            if readable is not None:   # only the caller's keys
                rows = [r for r in rows if readable(r[0])]
            if not rows:
                yield _blank("")
                return
            for key, v in rows:
                yield kvs_pb2.Tupla(chave=key, valor=v.value, versao=v.number)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("snapshot failed")
            errors.add(f"internal error: {e}")
        finally:
            errors.send()



def _members(rows: list[dict]) -> list:
    return [kvs_pb2.Member(**r) for r in rows]


class KVSExtServicer(kvs_pb2_grpc.KVSExtServicer):
    def __init__(self, node: Node, peers=None, auth: Authority = OPEN_AUTHORITY):
        self.log = node
        self.peers = peers
        self.auth = auth
        # MemberRemove replies by request id: a client's retry after a lost answer gets
        # the first reply, not "not a member".
        self._removals: collections.OrderedDict[str, object] = collections.OrderedDict()

    async def History(self, request, context):
        await _require(self.auth, context, READ, request.chave)
        # Plain History answers from this server's state even while it catches up (an
        # inspection tool, like ListKeys); a call asking for an order waits like a read.
        if linearizable(context) or has_after(context):
            await self._gate(context)
        limit = min(request.limit or HISTORY_DEFAULT, HISTORY_MAX)
        versions, top, more = self.log.reader.history(request.chave, limit,
                                                      max(0, request.before_version))
        _Errors(context).send()
        return kvs_pb2.KeyHistory(
            chave=request.chave, max_version=min(top, INT32_MAX), more=more,
            versions=[kvs_pb2.VersionInfo(versao=v.number, valor=v.value, written_at=v.written_at,
                                          node=v.node, seq=v.seq) for v in versions])

    async def ListKeys(self, request, context):
        limit = min(request.limit or 1000, 100_000)
        after = request.start_after or None
        readable = self.auth.read_filter()
        keys, truncated = self.log.reader.keys(request.prefix, limit, after)
        if readable is not None:   # only the caller's keys: page on until the limit is met
            out = [k for k in keys if readable(k)]
            while truncated and keys and len(out) < limit:
                keys, truncated = self.log.reader.keys(request.prefix, limit, keys[-1])
                out += [k for k in keys if readable(k)]
            keys, truncated = out[:limit], truncated or len(out) > limit
        return kvs_pb2.KeyList(keys=keys, truncated=truncated)

    async def WhoAmI(self, request, context):
        who = self.auth.caller()
        tls = context.auth_context().get("transport_security_type") == [b"ssl"]
        return kvs_pb2.Identity(name=who.name, roles=list(who.roles), method=who.method,
                                admin=who.admin, read_prefixes=list(who.read_prefixes),
                                write_prefixes=list(who.write_prefixes), tls=tls)

    async def Status(self, request, context):
        s = self.log.status()
        peers = [kvs_pb2.PeerInfo(node_id=n, address=a, online=o) for n, a, o in s.pop("peers")]
        members = _members(s.pop("members"))
        return kvs_pb2.NodeStatus(peers=peers, members=members, **s)

    async def MemberList(self, request, context):
        s = self.log.status()
        return kvs_pb2.MemberListReply(members=_members(s["members"]), leader=s["leader"],
                                       cluster_id=s["cluster_id"])

    async def MemberRemove(self, request, context):
        try:
            rid = request_id(context)
        except InvalidInput as e:
            return kvs_pb2.MemberRemoveReply(ok=False, error=str(e))
        if rid and rid in self._removals:
            return self._removals[rid]
        reply = await self._member_remove(request)
        if rid and reply.ok:
            self._removals[rid] = reply
            while len(self._removals) > 1000:
                self._removals.popitem(last=False)
        return reply

    async def _member_remove(self, request):
        try:
            await self.log.remove_member(request.node_id)
        except NotLeader as e:
            if not e.addr or self.peers is None:
                return kvs_pb2.MemberRemoveReply(ok=False, error=f"{e}; try again")
            try:   # ask the leader on the client's behalf
                return await asyncio.to_thread(self.peers.member_remove, e.addr, request.node_id)
            except Exception as fe:
                return kvs_pb2.MemberRemoveReply(ok=False, error=f"{e}: {fe}")
        except ValueError as e:
            return kvs_pb2.MemberRemoveReply(ok=False, error=str(e))
        except Exception as e:
            log.exception("member remove failed")
            return kvs_pb2.MemberRemoveReply(ok=False, error=f"internal error: {e}")
        return kvs_pb2.MemberRemoveReply(ok=True, members=_members(self.log.members()))


    # ---- watch ------------------------------------------------------------------
    async def Watch(self, request, context):
        """Committed changes under a prefix, as pre-encoded WatchResponse bytes (the
        hub encodes each change once for every watcher; see add_ext_servicer)."""
        allowed = await self._watch_filter(request.prefix, context)
        hub = self.log.watch
        try:
            w = hub.open(request.prefix, request.start_position, allowed)
        except WatchError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        try:
            # which server the watcher is on (stream calls have no peer() in the client)
            await context.send_initial_metadata(((NODE_KEY, self.log.node),))
            yield encode_head(w.next - 1)
            while True:
                try:
                    msg = await hub.next_message(w)
                except WatchError as e:
                    await context.abort(getattr(grpc.StatusCode, e.code), str(e))
                yield msg
        finally:
            hub.close(w)

    async def _watch_filter(self, prefix: str, context):
        """None: every key under ``prefix`` is readable; else a per-key predicate.
        A prefix the caller can read nothing under is refused."""
        who = self.auth.caller()
        if self.auth.policy is None or who.reads_all or who.may(READ, prefix):
            return None
        if any(p.startswith(prefix) for p in who.read_prefixes):
            return lambda key: who.may(READ, key)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{who.describe()} may not read keys under {prefix!r:.300}")

    # ---- retention ----------------------------------------------------------------
    def _retention_info(self, dropped: int = 0):
        return kvs_pb2.RetentionInfo(dropped=dropped, **self.log.retention())

    async def _admin_change(self, context, submit) -> object:
        who = self.auth.caller()
        if not who.admin:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{who.describe()} may not change retention: admin only")
        try:
            rid = request_id(context)
        except InvalidInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        out = await KVSServicer._finish(submit(rid))
        if out.version < 0:
            if not out.settled or out.reason.startswith("no quorum"):
                code = grpc.StatusCode.UNAVAILABLE
            elif out.reason.startswith("compacted"):
                code = grpc.StatusCode.FAILED_PRECONDITION
            else:
                code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, out.reason)
        return self._retention_info(out.version)

    async def Compact(self, request, context):
        if request.position < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "compaction position must be >= 1")
        return await self._admin_change(
            context, lambda rid: self.log.submit_compact(request.position, rid))

    async def Retention(self, request, context):
        if not request.set:
            return self._retention_info()
        if request.keep_versions > INT32_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"keep-versions must be <= {INT32_MAX}")
        return await self._admin_change(
            context, lambda rid: self.log.submit_retention(request.keep_versions, rid))

    # ---- export -------------------------------------------------------------------
    async def Export(self, request, context):
        await self._gate(context)
        readable = self.auth.read_filter()
        position, rows = await asyncio.to_thread(self.log.reader.export_rows, request.prefix)
        if readable is not None:
            rows = [r for r in rows if readable(r[0])]
        chunks = _export_chunks(position, rows)
        end = object()
        while True:   # chunks are built in a worker thread, sent from the loop
            chunk = await asyncio.to_thread(next, chunks, end)
            if chunk is end:
                _Errors(context).send()
                return
            yield chunk

    async def _gate(self, context) -> None:
        """Ends the call unless it may read (see :func:`read_gate`): a malformed
        ``kvs-after`` is INVALID_ARGUMENT, anything else UNAVAILABLE (another server
        may answer)."""
        reason = await read_gate(self.log, context)
        if reason is not None:
            code = (grpc.StatusCode.INVALID_ARGUMENT if reason.startswith(AFTER_KEY)
                    else grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, reason)


def _export_chunks(position: int, rows):
    keys: list = []
    size = 0
    for key, max_version, versions in rows:
        part: list = []
        for v in versions:
            n = len(v.value) + len(key) + 48
            if (part or keys) and size + n > EXPORT_CHUNK_BYTES:
                if part:
                    keys.append(kvs_pb2.ExportedKey(chave=key, max_version=max_version,
                                                    versions=part))
                yield kvs_pb2.ExportChunk(position=position, keys=keys)
                keys, part, size = [], [], 0
            part.append(kvs_pb2.VersionInfo(versao=v.number, valor=v.value, seq=v.seq,
                                            written_at=v.written_at, node=v.node))
            size += n
        if part:
            keys.append(kvs_pb2.ExportedKey(chave=key, max_version=max_version, versions=part))
    yield kvs_pb2.ExportChunk(position=position, keys=keys)


def add_ext_servicer(servicer: KVSExtServicer, server) -> None:
    """The generated ``add_KVSExtServicer_to_server``, built from the service descriptor,
    with one difference: Watch yields bytes its hub encoded once for every watcher, so
    its serializer passes them through."""
    desc = kvs_pb2.DESCRIPTOR.services_by_name["KVSExt"]
    handlers = {}
    for m in desc.methods:
        request_type = getattr(kvs_pb2, m.input_type.name)
        response_type = getattr(kvs_pb2, m.output_type.name)
        serializer = (lambda b: b) if m.name == "Watch" else response_type.SerializeToString
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name),
                                request_deserializer=request_type.FromString,
                                response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name,
                                                                          handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


class ReplicaServicer(kvs_pb2_grpc.ReplicaServicer):
    def __init__(self, node: Node):
        self.log = node

    async def FetchState(self, request, context):
        # The copy is taken at one applied index; chunks are encoded in a worker thread.
        chunks = await asyncio.to_thread(self.log.export_state)
        end = object()
        while True:
            chunk = await asyncio.to_thread(next, chunks, end)
            if chunk is end:
                return
            yield kvs_pb2.Blob(payload=chunk)
