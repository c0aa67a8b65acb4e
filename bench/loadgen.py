"""asyncio (grpc.aio) load generator for KVS — runs in its own process.

Two ways to use it:

* as a worker for ``bench/run.py``: ``python bench/loadgen.py --serve`` reads one JSON
  command per line on stdin and answers one JSON line on stdout (logs go to stderr);
* by hand: ``python bench/loadgen.py --target 127.0.0.1:9000 unary --op insere -c 64 -d 3``
  (run ``--help`` for the sub-commands) prints the result as JSON.

Workloads (all latencies are ``time.perf_counter`` around one awaited call):

* ``unary``     closed loop, ``concurrency`` coroutines each awaiting one Insere / Consulta at a
                time for ``duration`` seconds after ``warmup`` seconds; calls/s, p50/p99/mean.
* ``stream``    one bidi stream (InsereVarias / ConsultaVarias) pushing ``items`` pre-built
                requests while the replies are read; items/s = items / (last reply - call start).
* ``snapshot``  one Snapshot(0) call streamed to the end; seconds and tuples received.
* ``populate``  InsereVarias of keys ``<prefix>NNNNNN`` (used to load 100k keys).
* ``lag``       replication lag: ~``rate`` Insere/s at the writer; after each ack, Consulta is
                polled back-to-back at every reader until it returns that version; the lag is
                (reply time of the first Consulta that sees it) - (ack time at the writer),
                so it includes one Consulta round trip — the ``lag_floor`` figure measured
                the same way against the empty server is that round trip.

Errors (RPC failures, -1 versions) are counted, never hidden: every result has ``errors``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from kvs_common.channel import make_channel  # noqa: E402
from kvs_common.wire import CLIENT_MAX_MESSAGE  # noqa: E402
from kvs_proto import kvs_pb2, kvs_pb2_grpc  # noqa: E402

perf = time.perf_counter
VALUE = "v" * 16  # a small, valid value (>= 3 chars)

# One channel per target for the lifetime of the worker process.
_channels: dict[str, grpc.aio.Channel] = {}
_OPTIONS = [("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE),
            ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE)]


def _stub(target: str) -> kvs_pb2_grpc.KVSStub:
    ch = _channels.get(target)
    if ch is None:
        ch = make_channel(target, options=_OPTIONS, aio=True)
        _channels[target] = ch
    return kvs_pb2_grpc.KVSStub(ch)


def pct(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def lat_summary(lats: list[float]) -> dict:
    lats.sort()
    ms = 1000.0
    return {
        "n": len(lats),
        "p50_ms": None if not lats else pct(lats, 0.50) * ms,
        "p99_ms": None if not lats else pct(lats, 0.99) * ms,
        "max_ms": None if not lats else lats[-1] * ms,
        "mean_ms": None if not lats else sum(lats) / len(lats) * ms,
    }


# ----------------------------------------------------------------------------- unary
def _requests(op: str, key_prefix: str, keys: int, n: int = 4096) -> list:
    rnd = random.Random(12345)
    if op == "insere":
        # cycle over `keys` keys so the store grows in versions, not in keys
        return [kvs_pb2.ChaveValor(chave=f"{key_prefix}{i % keys:06d}", valor=VALUE) for i in range(n)]
    if op == "consulta":
        return [kvs_pb2.ChaveVersao(chave=f"{key_prefix}{rnd.randrange(keys):06d}") for _ in range(n)]
    raise ValueError(f"unknown unary op {op!r}")


async def unary(target: str, op: str = "insere", concurrency: int = 1, duration: float = 2.0,
                warmup: float = 0.3, keys: int = 1000, key_prefix: str = "ins-",
                timeout: float = 10.0) -> dict:
    stub = _stub(target)
    method = stub.Insere if op == "insere" else stub.Consulta
    reqs = _requests(op, key_prefix, keys)
    nreq = len(reqs)
    errors = 0
    first_error = None

    async def worker(wid: int, end: float, lats: list | None) -> int:
        nonlocal errors, first_error
        i = wid * 7919
        done = 0
        while perf() < end:
            req = reqs[i % nreq]
            i += 1
            t0 = perf()
            try:
                r = await method(req, timeout=timeout)
            except grpc.RpcError as e:  # counted, and the loop goes on
                errors += 1
                first_error = first_error or f"{e.code()}: {e.details()}"
                continue
            t1 = perf()
            if op == "insere" and r.versao <= 0:
                errors += 1
                first_error = first_error or f"Insere returned {r.versao}"
            if lats is not None:
                lats.append(t1 - t0)
            done += 1
        return done

    if warmup > 0:
        await asyncio.gather(*(worker(w, perf() + warmup, None) for w in range(concurrency)))
        errors = 0
    lats: list[float] = []
    t_start = perf()
    end = t_start + duration
    counts = await asyncio.gather(*(worker(w, end, lats) for w in range(concurrency)))
    elapsed = perf() - t_start
    calls = sum(counts)
    return {"kind": "unary", "op": op, "concurrency": concurrency, "calls": calls,
            "elapsed_s": elapsed, "rate": calls / elapsed if elapsed > 0 else 0.0,
            "errors": errors, "first_error": first_error, **lat_summary(lats)}


# ----------------------------------------------------------------------------- streams
async def stream(target: str, op: str = "insere", items: int = 10000, keys: int = 1000,
                 key_prefix: str = "iv-", timeout: float = 300.0) -> dict:
    stub = _stub(target)
    if op == "insere":
        # cycle over `keys` keys: the store grows in versions, not in keys
        reqs = [kvs_pb2.ChaveValor(chave=f"{key_prefix}{i % keys:06d}", valor=VALUE) for i in range(items)]
        method = stub.InsereVarias
    elif op == "consulta":
        rnd = random.Random(4242)
        reqs = [kvs_pb2.ChaveVersao(chave=f"{key_prefix}{rnd.randrange(keys):06d}") for _ in range(items)]
        method = stub.ConsultaVarias
    else:
        raise ValueError(f"unknown stream op {op!r}")
    errors = 0
    first_error = None
    got = 0
    t0 = perf()
    try:
        call = method(iter(reqs), timeout=timeout)
        async for r in call:
            got += 1
            if op == "insere" and r.versao <= 0:
                errors += 1
                first_error = first_error or f"InsereVarias returned {r.versao}"
    except grpc.RpcError as e:
        errors += 1
        first_error = f"{e.code()}: {e.details()}"
    elapsed = perf() - t0
    if got != items:
        errors += 1
        first_error = first_error or f"{got} replies for {items} requests"
    return {"kind": "stream", "op": op, "items": items, "replies": got, "elapsed_s": elapsed,
            "rate": got / elapsed if elapsed > 0 else 0.0, "errors": errors, "first_error": first_error}


async def populate(target: str, n: int, key_prefix: str = "k", start: int = 0,
                   chunk: int = 20000, timeout: float = 600.0) -> dict:
    """Insert keys key_prefix+NNNNNN for NNNNNN in [start, start+n) over InsereVarias streams."""
    stub = _stub(target)
    errors = 0
    first_error = None
    done = 0
    t0 = perf()
    for lo in range(start, start + n, chunk):
        hi = min(start + n, lo + chunk)
        reqs = (kvs_pb2.ChaveValor(chave=f"{key_prefix}{i:06d}", valor=VALUE) for i in range(lo, hi))
        try:
            async for r in stub.InsereVarias(reqs, timeout=timeout):
                done += 1
                if r.versao <= 0:
                    errors += 1
                    first_error = first_error or f"InsereVarias returned {r.versao}"
        except grpc.RpcError as e:
            errors += 1
            first_error = f"{e.code()}: {e.details()}"
            break
    elapsed = perf() - t0
    return {"kind": "populate", "items": n, "replies": done, "elapsed_s": elapsed,
            "rate": done / elapsed if elapsed > 0 else 0.0, "errors": errors, "first_error": first_error}


async def snapshot(target: str, timeout: float = 600.0) -> dict:
    stub = _stub(target)
    n = 0
    errors = 0
    first_error = None
    t0 = perf()
    t_first = None
    try:
        async for _t in stub.Snapshot(kvs_pb2.Versao(versao=0), timeout=timeout):
            if t_first is None:
                t_first = perf()
            n += 1
    except grpc.RpcError as e:
        errors += 1
        first_error = f"{e.code()}: {e.details()}"
    elapsed = perf() - t0
    return {"kind": "snapshot", "tuples": n, "elapsed_s": elapsed,
            "first_tuple_ms": None if t_first is None else (t_first - t0) * 1000,
            "rate": n / elapsed if elapsed > 0 else 0.0, "errors": errors, "first_error": first_error}


# ----------------------------------------------------------------------------- replication lag
async def lag(writer: str, readers: list[str], rate: float = 100.0, count: int = 500,
              key_prefix: str = "lag-", deadline: float = 5.0) -> dict:
    """~`rate` Insere/s at `writer`; time from each ack until every reader's Consulta sees it."""
    w = _stub(writer)
    rs = [_stub(r) for r in readers]
    lags: list[float] = []        # (first seeing reply) - ack        (includes one Consulta RTT)
    lags_lo: list[float] = []     # (send of first seeing Consulta) - ack   (lower bound)
    acks: list[float] = []
    polls = 0
    errors = 0
    first_error = None
    salt = f"{os.getpid()}-{int(time.time() * 1000) % 10**8}"

    async def one(i: int) -> None:
        nonlocal errors, first_error
        key = f"{key_prefix}{salt}-{i:06d}"
        val = f"val-{i:06d}"
        t0 = perf()
        try:
            v = (await w.Insere(kvs_pb2.ChaveValor(chave=key, valor=val), timeout=deadline)).versao
        except grpc.RpcError as e:
            errors += 1
            first_error = first_error or f"Insere: {e.code()}: {e.details()}"
            return
        t_ack = perf()
        acks.append(t_ack - t0)
        if v <= 0:
            errors += 1
            first_error = first_error or f"Insere returned {v}"
            return
        req = kvs_pb2.ChaveVersao(chave=key)

        async def poll(stub) -> None:
            nonlocal errors, first_error, polls
            while True:
                ts = perf()
                if ts - t_ack > deadline:
                    errors += 1
                    first_error = first_error or f"not visible after {deadline}s"
                    return
                try:
                    r = await stub.Consulta(req, timeout=deadline)
                except grpc.RpcError as e:
                    errors += 1
                    first_error = first_error or f"Consulta: {e.code()}: {e.details()}"
                    return
                polls += 1
                if r.versao >= v:
                    te = perf()
                    lags.append(te - t_ack)
                    lags_lo.append(max(0.0, ts - t_ack))
                    return

        await asyncio.gather(*(poll(s) for s in rs))

    period = 1.0 / rate
    tasks = []
    t_begin = perf()
    for i in range(count):
        due = t_begin + i * period
        delay = due - perf()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing of the offered load, not synchronisation
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    elapsed = perf() - t_begin
    out = {"kind": "lag", "writer": writer, "readers": readers, "writes": count,
           "offered_rate": rate, "achieved_rate": count / elapsed if elapsed > 0 else 0.0,
           "polls": polls, "errors": errors, "first_error": first_error}
    out.update(lat_summary(lags))
    lo = lat_summary(lags_lo)
    out["lo_p50_ms"], out["lo_p99_ms"] = lo["p50_ms"], lo["p99_ms"]
    a = lat_summary(acks)
    out["ack_p50_ms"], out["ack_p99_ms"] = a["p50_ms"], a["p99_ms"]
    return out


# ----------------------------------------------------------------------------- worker loop
COMMANDS = {"unary": unary, "stream": stream, "populate": populate, "snapshot": snapshot, "lag": lag}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
            name = cmd.pop("cmd")
            if name == "quit":
                break
            res = await COMMANDS[name](**cmd)
            res["ok"] = True
        except Exception as e:  # report, keep serving
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out.write(json.dumps(res) + "\n")
        out.flush()
    for ch in _channels.values():
        await ch.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="JSON-lines worker mode (used by run.py)")
    ap.add_argument("--target", default="127.0.0.1:9000")
    sub = ap.add_subparsers(dest="cmd")
    u = sub.add_parser("unary")
    u.add_argument("--op", choices=("insere", "consulta"), default="insere")
    u.add_argument("-c", "--concurrency", type=int, default=64)
    u.add_argument("-d", "--duration", type=float, default=3.0)
    u.add_argument("--keys", type=int, default=1000)
    u.add_argument("--key-prefix", default="ins-")
    s = sub.add_parser("stream")
    s.add_argument("--op", choices=("insere", "consulta"), default="insere")
    s.add_argument("-n", "--items", type=int, default=10000)
    s.add_argument("--keys", type=int, default=1000)
    s.add_argument("--key-prefix", default="iv-")
    p = sub.add_parser("populate")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--key-prefix", default="k")
    sub.add_parser("snapshot")
    lg = sub.add_parser("lag")
    lg.add_argument("--readers", default="", help="comma-separated; default: the target itself")
    lg.add_argument("--rate", type=float, default=100.0)
    lg.add_argument("--count", type=int, default=500)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    t = args.target
    if args.cmd == "unary":
        coro = unary(t, args.op, args.concurrency, args.duration, keys=args.keys, key_prefix=args.key_prefix)
    elif args.cmd == "stream":
        coro = stream(t, args.op, args.items, keys=args.keys, key_prefix=args.key_prefix)
    elif args.cmd == "populate":
        coro = populate(t, args.n, key_prefix=args.key_prefix)
    elif args.cmd == "snapshot":
        coro = snapshot(t)
    elif args.cmd == "lag":
        readers = [r for r in args.readers.split(",") if r] or [t]
        coro = lag(t, readers, rate=args.rate, count=args.count)
    else:
        ap.error("give a sub-command or --serve")
    print(json.dumps(asyncio.run(coro), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
