"""gRPC servicers: validate, hand changes to the log, read the store, map results.

Nothing here mutates the store.  Every handler catches everything: an
invalid request or an internal error is answered with -1 / a blank Tupla and
the reason in the ``kvs-error`` trailing metadata, never with an exception
escaping to grpc (except RESOURCE_EXHAUSTED, which grpc raises itself).
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Callable, Iterable, Iterator

import grpc

from kvs_proto import kvs_pb2, kvs_pb2_grpc

from .log import Outcome, ReplicatedLog
from .peers import LogTooOld
from .store import INT32_MAX, InvalidInput, check_key, check_value

log = logging.getLogger(__name__)

ERROR_KEY = "kvs-error"
STREAM_WINDOW = 512     # changes of one stream in flight at once (flow control)
MAX_STREAM_ERRORS = 5   # reasons reported per stream


def _version_arg(msg) -> int | None:
    """SPEC: "no version" is an absent field or one <= 0."""
    return msg.versao if msg.HasField("versao") and msg.versao > 0 else None


class _Errors:
    """Collects reasons and sends them once, as trailing metadata.  Also tells
    the client which server answered (initial metadata ``kvs-node``), which
    matters when a client balances over several servers."""

    node_md: tuple = ()

    def __init__(self, context):
        self.context = context
        self.reasons: list[str] = []
        try:
            context.send_initial_metadata(self.node_md)
        except Exception:  # already sent / call gone
            pass

    def add(self, reason: str, index: int | None = None) -> None:
        if len(self.reasons) < MAX_STREAM_ERRORS:
            self.reasons.append(reason if index is None else f"#{index}: {reason}")

    def send(self) -> None:
        if self.reasons:
            # Metadata values must be ASCII-safe; keep the text readable.
            text = "; ".join(self.reasons).encode("ascii", "backslashreplace").decode("ascii")
            self.context.set_trailing_metadata(((ERROR_KEY, text[:4000]),))


class KVSServicer(kvs_pb2_grpc.KVSServicer):
    def __init__(self, rlog: ReplicatedLog, write_timeout: float,
                 max_key_len: int | None = None, max_value_len: int | None = None):
        self.log = rlog
        _Errors.node_md = (("kvs-node", rlog.node),)
        self.write_timeout = write_timeout + 1.0
        self.max_key_len = max_key_len
        self.max_value_len = max_value_len

    # ---- single operations -------------------------------------------------
    def _start_put(self, req) -> concurrent.futures.Future:
        try:
            check_key(req.chave, self.max_key_len)
            check_value(req.valor, self.max_value_len)
        except InvalidInput as e:
            return _done(Outcome(-1, str(e)))
        return self.log.submit_put(req.chave, req.valor)

    def _start_del(self, req) -> concurrent.futures.Future:
        try:
            check_key(req.chave, self.max_key_len)
        except InvalidInput as e:
            return _done(Outcome(-1, str(e)))
        return self.log.submit_del(req.chave, _version_arg(req))

    def _finish(self, fut: concurrent.futures.Future) -> Outcome:
        try:
            return fut.result(timeout=self.write_timeout)
        except concurrent.futures.TimeoutError:
            return Outcome(-1, "timed out waiting for replication")
        except Exception as e:  # pragma: no cover - defensive
            log.exception("write failed")
            return Outcome(-1, f"internal error: {e}")

    def _lookup(self, req) -> tuple[kvs_pb2.Tupla, str]:
        try:
            check_key(req.chave, self.max_key_len)
        except InvalidInput as e:
            return kvs_pb2.Tupla(chave=req.chave, valor="", versao=0), str(e)
        reason = self.log.wait_readable()
        if reason is not None:
            return kvs_pb2.Tupla(chave=req.chave, valor="", versao=0), reason
        with self.log.store_lock:
            found = self.log.store.get(req.chave, _version_arg(req))
        if found is None:
            return kvs_pb2.Tupla(chave=req.chave, valor="", versao=0), ""
        return kvs_pb2.Tupla(chave=req.chave, valor=found.value, versao=found.number), ""

    def Insere(self, request, context):
        return self._unary(context, lambda: self._finish(self._start_put(request)))

    def Remove(self, request, context):
        return self._unary(context, lambda: self._finish(self._start_del(request)))

    def _unary(self, context, run: Callable[[], Outcome]) -> kvs_pb2.Versao:
        errors = _Errors(context)
        try:
            out = run()
        except Exception as e:
            log.exception("unexpected error")
            out = Outcome(-1, f"internal error: {e}")
        if out.version < 0:
            errors.add(out.reason or "failed")
        errors.send()
        return kvs_pb2.Versao(versao=out.version)

    def Consulta(self, request, context):
        errors = _Errors(context)
        try:
            tupla, reason = self._lookup(request)
        except Exception as e:
            log.exception("unexpected error")
            tupla, reason = kvs_pb2.Tupla(chave=request.chave), f"internal error: {e}"
        if reason:
            errors.add(reason)
        errors.send()
        return tupla

    # ---- streams: one reply per request, in order, pipelined ------------------
    def InsereVarias(self, request_iterator, context):
        return self._pipelined(request_iterator, context, self._start_put)

    def RemoveVarias(self, request_iterator, context):
        return self._pipelined(request_iterator, context, self._start_del)

    def _pipelined(self, requests: Iterable, context, start) -> Iterator[kvs_pb2.Versao]:
        """Submits while earlier changes are still replicating; a bounded
        window keeps one client from queueing unbounded work."""
        errors = _Errors(context)
        window = threading.Semaphore(STREAM_WINDOW)
        futures: queue.SimpleQueue = queue.SimpleQueue()
        DONE = object()

        def reader():
            try:
                for req in requests:
                    window.acquire()
                    try:
                        futures.put(start(req))
                    except Exception as e:
                        log.exception("unexpected error")
                        futures.put(_done(Outcome(-1, f"internal error: {e}")))
            except Exception as e:  # client went away or sent garbage
                futures.put(e)
            futures.put(DONE)

        threading.Thread(target=reader, daemon=True, name="kvs-stream-reader").start()
        index = 0
        try:
            while True:
                item = futures.get()
                if item is DONE:
                    break
                if isinstance(item, Exception):
                    if isinstance(item, grpc.RpcError):
                        break
                    errors.add(f"stream error: {item}")
                    break
                out = self._finish(item)
                window.release()
                if out.version < 0:
                    errors.add(out.reason or "failed", index)
                index += 1
                yield kvs_pb2.Versao(versao=out.version)
        finally:
            errors.send()

    def ConsultaVarias(self, request_iterator, context):
        errors = _Errors(context)
        index = 0
        try:
            for req in request_iterator:
                try:
                    tupla, reason = self._lookup(req)
                except Exception as e:
                    log.exception("unexpected error")
                    tupla, reason = kvs_pb2.Tupla(chave=req.chave), f"internal error: {e}"
                if reason:
                    errors.add(reason, index)
                index += 1
                yield tupla
        finally:
            errors.send()

    def Snapshot(self, request, context):
        errors = _Errors(context)
        try:
            reason = self.log.wait_readable()
            if reason is not None:
                errors.add(reason)
                yield kvs_pb2.Tupla(chave="", valor="", versao=0)
                return
            version = request.versao if request.versao > 0 else None
            with self.log.store_lock:
                rows = list(self.log.store.snapshot(version))
            if not rows:
                yield kvs_pb2.Tupla(chave="", valor="", versao=0)
                return
            for key, v in rows:
                yield kvs_pb2.Tupla(chave=key, valor=v.value, versao=v.number)
        except Exception as e:
            log.exception("snapshot failed")
            errors.add(f"internal error: {e}")
        finally:
            errors.send()


class KVSExtServicer(kvs_pb2_grpc.KVSExtServicer):
    def __init__(self, rlog: ReplicatedLog):
        self.log = rlog

    def History(self, request, context):
        with self.log.store_lock:
            versions = self.log.store.history(request.chave)
            top = self.log.store.max_version(request.chave)
        return kvs_pb2.KeyHistory(
            chave=request.chave, max_version=min(top, INT32_MAX),
            versions=[kvs_pb2.VersionInfo(versao=v.number, valor=v.value, written_at=v.written_at,
                                          node=v.node, seq=v.seq) for v in versions])

    def ListKeys(self, request, context):
        limit = request.limit or 1000
        limit = min(limit, 100_000)
        with self.log.store_lock:
            keys, truncated = self.log.store.keys(request.prefix, limit,
                                                  request.start_after or None)
        return kvs_pb2.KeyList(keys=keys, truncated=truncated)

    def Status(self, request, context):
        s = self.log.status()
        peers = [kvs_pb2.PeerInfo(node_id=n, address=a, online=o) for n, a, o in s.pop("peers")]
        return kvs_pb2.NodeStatus(peers=peers, **s)


class ReplicaServicer(kvs_pb2_grpc.ReplicaServicer):
    def __init__(self, rlog: ReplicatedLog):
        self.log = rlog

    def FetchLog(self, request, context):
        try:
            payloads = self.log.batches_from(request.from_seq, request.to_seq)
        except LogTooOld as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        for p in payloads:
            yield kvs_pb2.Blob(payload=p)

    def FetchState(self, request, context):
        for chunk in self.log.export_state():
            yield kvs_pb2.Blob(payload=chunk)


def _done(outcome: Outcome) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(outcome)
    return f
