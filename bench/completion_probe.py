"""Time kvs_shell's completer over a real server's key set (run as its own process by run.py).

    python bench/completion_probe.py --target 127.0.0.1:9000 --keys 100000 [--rounds 200]

The server must hold keys ``k000000 .. k{keys-1:06d}`` (run.py loads them).  The probe builds the
shell's own client and completer the way the shell does, then times ``get_completions`` (the call
prompt_toolkit makes on every keystroke) for typed lines such as ``get k01``, ``get k0123``,
``history k00042`` and ``get k000042 `` (version completion), each with a fresh random prefix.
Reported: the first (cold) completion, then p50 / p99 / max over ``rounds`` completions, and how
many completions each produced (an empty answer is counted, so a completer that returns nothing
while its cache loads cannot look fast without it showing).

Prints one JSON line; ``{"skipped": reason}`` when kvs_shell.completer is not there (exit 0).
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

perf = time.perf_counter


def _pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, max(0, int(round(q * (len(vals) - 1)))))]


def _make_completer(mod, target: str):
    """Build the completer the way the shell would; adapt to its constructor."""
    from prompt_toolkit.completion import Completer

    client = None
    try:
        from kvs_shell.client import Client

        client = Client([target])
    except Exception:
        client = None
    factory = getattr(mod, "make_completer", None) or getattr(mod, "build_completer", None)
    candidates = []
    if callable(factory):
        candidates.append(factory)
    for _name, obj in vars(mod).items():
        if inspect.isclass(obj) and issubclass(obj, Completer) and obj.__module__ == mod.__name__:
            candidates.append(obj)
    errors = []
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    probe = Document("get k0", 6)
    for c in candidates:
        # KVSCompleter takes a client *source* (a callable returning the client); try that first,
        # then a client, then nothing — and keep the first that actually completes a key.
        for attempt in ((lambda: client,), (client,), ()):
            try:
                comp = c(*attempt)
                if hasattr(comp, "get_completions") and list(comp.get_completions(probe, CompleteEvent())):
                    return comp, client
                errors.append(f"{getattr(c, '__name__', c)} with {len(attempt)} arg(s): no completions for 'get k0'")
            except Exception as e:  # try the next way of building it
                errors.append(f"{getattr(c, '__name__', c)} with {len(attempt)} arg(s): {e}")
    raise RuntimeError("could not build a working completer from kvs_shell.completer: " + "; ".join(errors[:6]))


def run(target: str, keys: int, key_prefix: str = "k", rounds: int = 200) -> dict:
    try:
        import kvs_shell.completer as mod
    except ImportError as e:
        return {"skipped": f"kvs_shell.completer not importable ({e})"}
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    comp, client = _make_completer(mod, target)
    ev = CompleteEvent(completion_requested=True)
    rnd = random.Random(7)
    width = 6

    def line() -> str:
        kind = rnd.random()
        n = rnd.randrange(max(1, keys))
        digits = f"{n:0{width}d}"
        if kind < 0.7:   # key completion, prefix of 1..5 digits
            return f"{rnd.choice(('get', 'put', 'del', 'history'))} {key_prefix}{digits[:rnd.randint(1, 5)]}"
        if kind < 0.85:  # bare command word
            return rnd.choice(("g", "ge", "hi", "sn", "pu"))
        return f"get {key_prefix}{digits} "  # versions of a full key

    def once(text: str) -> tuple[float, int]:
        doc = Document(text, len(text))
        t0 = perf()
        got = list(comp.get_completions(doc, ev))
        return perf() - t0, len(got)

    # the constructor check above already listed "k0"; the cold figure is a never-seen prefix
    cold, cold_n = once(f"get {key_prefix}{(keys - 1):06d}"[:-2])
    lats: list[float] = []
    counts: list[int] = []
    empty = 0
    samples = []
    for i in range(rounds):
        text = line()
        dtm, n = once(text)
        lats.append(dtm)
        counts.append(n)
        if n == 0 and not text.endswith(" "):
            empty += 1
        if i < 5:
            samples.append({"text": text, "ms": dtm * 1000, "completions": n})
    if client is not None and hasattr(client, "close"):
        try:
            client.close()
        except Exception:
            pass
    return {"kind": "completion", "keys": keys, "rounds": rounds, "cold_ms": cold * 1000, "cold_completions": cold_n,
            "p50_ms": _pct(lats, 0.5) * 1000, "p99_ms": _pct(lats, 0.99) * 1000, "max_ms": max(lats) * 1000,
            "mean_completions": sum(counts) / len(counts), "empty_answers": empty, "samples": samples,
            "completer": type(comp).__name__,
            "server_listings": getattr(getattr(comp, "refresher", None), "fetches", None), "errors": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--key-prefix", default="k")
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.target, a.keys, a.key_prefix, a.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
