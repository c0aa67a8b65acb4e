"""Small helpers both benchmark drivers (run.py, watch_bench.py) use."""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable

import grpc

from kvs_common.channel import make_channel
from kvs_common.status import fetch_status


def make_log(tag: str) -> Callable[[str], None]:
    """A logger printing ``[tag HH:MM:SS] msg`` to stderr."""
    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def status(addr: str, timeout: float = 2.0):
    """The server's Status, or None when it does not answer."""
    try:
        with make_channel(addr) as ch:
            return fetch_status(ch, timeout=timeout)
    except grpc.RpcError:
        return None


def wait_until(pred, timeout: float, what: str, interval: float = 0.02):
    """Poll ``pred`` (backing off to 0.25 s) until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # keep polling until the deadline
            last = e
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
