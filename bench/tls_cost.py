"""What TLS costs a KVS client: a new connection's first call (TCP + TLS handshake +
HTTP/2 set-up + one Status), and one Status on an open connection.

Measured against a one-server cluster per mode (plaintext, TLS, mutual TLS with the
shell's client certificate), one mode after the other so they do not share the CPU.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from kvs_common.channel import make_channel
from kvs_common.status import fetch_status

MODES = ("plaintext", "tls", "mutual")
# grpc shares connections between channels to the same target unless each channel
# has its own subchannel pool: without this a "new" channel would reuse a handshake.
FRESH = (("grpc.use_local_subchannel_pool", 1),)


def _pcts(secs: list[float]) -> dict:
    ms = sorted(s * 1000 for s in secs)
    return {"n": len(ms), "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))], "errors": 0}


def measure(factory, metadata, n: int) -> tuple[dict, dict]:
    """(connect: fresh channel + first Status, warm: Status on one open channel)."""
    fresh = []
    for _ in range(n):
        t0 = time.perf_counter()
        with factory() as ch:
            fetch_status(ch, metadata, timeout=10)
            fresh.append(time.perf_counter() - t0)
    warm = []
    with factory() as ch:
        fetch_status(ch, metadata, timeout=10)
        for _ in range(n):
            t0 = time.perf_counter()
            fetch_status(ch, metadata, timeout=10)
            warm.append(time.perf_counter() - t0)
    return _pcts(fresh), _pcts(warm)


def run_mode(mode: str, workdir: Path, n: int) -> tuple[dict, dict]:
    from kvs_cluster import Cluster, Security

    sec = None
    if mode != "plaintext":
        sec = Security.ensure(workdir / f"sec-{mode}", mutual_tls=(mode == "mutual"))
    with Cluster(n=1, workdir=workdir / mode, persistent=False, security=sec) as c:
        c.wait_ready(timeout=60)
        addr = c.addresses[0]
        factory = ((lambda: sec.channel(addr, FRESH)) if sec
                   else (lambda: make_channel(addr, options=FRESH)))
        return measure(factory, c.metadata(), n)
