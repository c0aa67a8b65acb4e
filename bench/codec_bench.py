"""Encode + decode of an APP message: server.codec (msgspec) against the stdlib
json module with hand-written validation of the same strictness.

    .venv/bin/python bench/codec_bench.py [--runs 5] [--seconds 0.3]

Shapes: one APP carrying N put items (64-byte values) in one normal entry
(a batched proposal), and N entries of one item each.  Each figure is the
median of ``--runs`` timed runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server import codec  # noqa: E402
from server.codec import BadMessage  # noqa: E402
from server.raft.types import CONF, NOOP, NORMAL, Entry, Message, MsgType  # noqa: E402


# ---------------------------------------------------------------------------
# The stdlib equivalent: json + checks by hand (what codec.py did before msgspec)
# ---------------------------------------------------------------------------
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DEFAULTS = {"term": 0, "log_term": 0, "index": 0, "commit": 0, "reject": False, "hint": 0, "ctx": ""}
_PUT_KEYS = frozenset(("id", "op", "k", "v", "node"))
_DEL_KEYS = frozenset(("id", "op", "k", "ver", "node"))


def std_encode(cid: str, m: Message) -> bytes:
    doc = {"t": "raft", "cid": cid, "type": m.type.value, "frm": m.frm, "to": m.to}
    for name, default in _DEFAULTS.items():
        v = getattr(m, name)
        if v != default:
            doc[name] = v
    if m.entries:
        doc["entries"] = [[e.term, e.index, e.kind, e.data] for e in m.entries]
    return _dumps(doc).encode("utf-8")


def _u64(v):
    if type(v) is not int or not 0 <= v < 2**63:
        raise BadMessage("bad int")
    return v


def _name(v):
    if type(v) is not str or not v:
        raise BadMessage("bad name")
    return v


def _item(it):
    if type(it) is not dict:
        raise BadMessage("item")
    op = it.get("op")
    if op == "put":
        if it.keys() != _PUT_KEYS or type(it["k"]) is not str or type(it["v"]) is not str:
            raise BadMessage("put")
    elif op == "del":
        ver = it.get("ver")
        if it.keys() != _DEL_KEYS or type(it["k"]) is not str or (
                ver is not None and (type(ver) is not int or not -2**31 <= ver < 2**31)):
            raise BadMessage("del")
    else:
        raise BadMessage("op")
    _name(it["id"]), _name(it["node"])


def _data(kind, data):
    if kind == NORMAL:
        if type(data) is not dict or data.keys() != {"ts", "items"}:
            raise BadMessage("normal")
        ts, items = data["ts"], data["items"]
        if type(ts) not in (int, float) or not math.isfinite(ts) or ts < 0:
            raise BadMessage("ts")
        if type(items) is not list or not items:
            raise BadMessage("items")
        for it in items:
            _item(it)
        data["ts"] = float(ts)
    elif kind == CONF:
        if type(data) is not dict:
            raise BadMessage("conf")
        op = data.get("op")
        if op == "bootstrap":
            vs = data.get("voters")
            if data.keys() != {"op", "voters"} or type(vs) is not list or not vs or not all(
                    type(v) is list and len(v) == 2 and _name(v[0]) and type(v[1]) is str for v in vs):
                raise BadMessage("bootstrap")
        elif op in ("add_learner", "promote", "remove"):
            if data.keys() != {"op", "node", "addr"} or type(data["addr"]) is not str:
                raise BadMessage("conf")
            _name(data["node"])
        else:
            raise BadMessage("conf op")
    elif kind != NOOP or data is not None:
        raise BadMessage("kind")
    return data


def std_decode(payload: bytes) -> tuple[str, Message]:
    if not isinstance(payload, bytes) or len(payload) > codec.MAX_DOC_BYTES:
        raise BadMessage("size")
    try:
        d = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise BadMessage(str(e)) from None
    if type(d) is not dict or d.get("t") != "raft":
        raise BadMessage("not a raft document")
    try:
        mtype = MsgType(d.get("type"))
    except ValueError:
        raise BadMessage("type") from None
    cid = d.get("cid")
    if type(cid) is not str:
        raise BadMessage("cid")
    f = {k: d.get(k, v) for k, v in _DEFAULTS.items()}
    for k in ("term", "log_term", "index", "commit", "hint"):
        _u64(f[k])
    if type(f["reject"]) is not bool or type(f["ctx"]) is not str:
        raise BadMessage("reject/ctx")
    raw = d.get("entries", [])
    if type(raw) is not list:
        raise BadMessage("entries")
    entries = []
    for e in raw:
        if type(e) is not list or len(e) != 4:
            raise BadMessage("entry")
        term, index, kind, data = e
        entries.append(Entry(_u64(term), _u64(index), kind, _data(kind, data), 0))
    return cid, Message(mtype, _name(d.get("frm")), _name(d.get("to")), f["term"], f["log_term"],
                        f["index"], tuple(entries), f["commit"], f["reject"], f["hint"], f["ctx"])


# ---------------------------------------------------------------------------
def app(n_items: int, per_entry: int) -> Message:
    items = [{"id": f"node-1:boot:{i}", "op": "put", "k": f"key-{i:06d}", "v": "v" * 64,
              "node": "node-1"} for i in range(n_items)]
    entries = tuple(Entry(5, 100 + j, NORMAL, {"ts": 1700000000.125, "items": items[i:i + per_entry]})
                    for j, i in enumerate(range(0, n_items, per_entry)))
    return Message(MsgType.APP, "node-1", "node-2", term=5, log_term=5, index=99, entries=entries,
                   commit=98)


def ops_per_second(encode, decode, m: Message, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(50):
            decode(encode("cluster-1", m))
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one timed run")
    args = ap.parse_args()
    impls = {"msgspec": (codec.encode_raft, codec.decode_raft), "stdlib": (std_encode, std_decode)}
    print(f"{'shape':<24}{'bytes':>8}{'msgspec ops/s':>16}{'stdlib ops/s':>16}{'ratio':>8}")
    for n in (1, 10, 100):
        shapes = [(n, f"1 entry x {n} put")] + ([(1, f"{n} entries x 1 put")] if n > 1 else [])
        for per_entry, label in shapes:
            m = app(n, per_entry)
            # both sides must agree on what they carry before their speed means anything
            assert std_decode(codec.encode_raft("cluster-1", m)) == codec.decode_raft(std_encode("cluster-1", m)) \
                == ("cluster-1", m)
            med = {name: statistics.median(ops_per_second(enc, dec, m, args.seconds)
                                           for _ in range(args.runs))
                   for name, (enc, dec) in impls.items()}
            size = len(codec.encode_raft("cluster-1", m))
            print(f"{label:<24}{size:>8}{med['msgspec']:>16,.0f}{med['stdlib']:>16,.0f}"
                  f"{med['msgspec'] / med['stdlib']:>7.1f}x")


if __name__ == "__main__":
    main()
