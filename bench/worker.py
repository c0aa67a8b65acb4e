"""A benchmark worker in its own process, driven by one JSON command per line.

The worker prints ``{"ready": true, "pid": ...}`` first, then answers each command with one
JSON object (``ok``, the result, or ``error`` and ``traceback``); ``{"cmd": "quit"}`` ends it.
Used by run.py (bench/loadgen.py --serve) and watch_bench.py (its writer worker).
"""
from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import Callable


class WorkerProcess:
    def __init__(self, argv: list[str], name: str, log: Callable[[str], None],
                 cwd: Path | None = None, timeout: float = 900.0):
        self.name, self.log, self.timeout = name, log, timeout
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        hello = self.q.get(timeout=30)
        if not hello or not hello.get("ready"):
            raise RuntimeError(f"{name} did not start: {hello}")
        self.pid = hello["pid"]

    def _reader(self) -> None:
        for line in self.proc.stdout:
            try:
                self.q.put(json.loads(line))
            except json.JSONDecodeError:
                self.log(f"{self.name}: {line.rstrip()}")
        self.q.put(None)

    def call(self, cmd: str, timeout: float | None = None, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        timeout = self.timeout if timeout is None else timeout
        try:
            res = self.q.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer to {cmd} within {timeout}s") from None
        if res is None:
            raise RuntimeError(f"{self.name} exited (code {self.proc.poll()})")
        if not res.get("ok"):
            raise RuntimeError(f"{self.name} {cmd} failed: {res.get('error')}\n"
                               f"{res.get('traceback', '')}")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
