"""kvs_shell with --servers: round robin over the cluster and failover when servers die."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import ROOT

from kvs_shell.client import Client, ServerUnavailable

pytestmark = pytest.mark.integration


class CuttingProxies:
    """TCP proxies in front of servers that cut one call mid-flight: once armed, the
    first client chunk holding ``trigger`` goes through to the server, but the server's
    answer is held back and the client's connection closed ``hold`` s later.  The
    server has made the change; the client only sees its connection break."""

    def __init__(self, ports, trigger: bytes, hold: float = 0.3):
        self.trigger, self.hold = trigger, hold
        self.armed = threading.Event()
        self.cuts: list[int] = []            # server ports whose answer was withheld
        self._lock = threading.Lock()
        self._listeners = []
        self.addresses = []
        for port in ports:
            ls = socket.create_server(("127.0.0.1", 0))
            self._listeners.append(ls)
            self.addresses.append(f"127.0.0.1:{ls.getsockname()[1]}")
            threading.Thread(target=self._accept, args=(ls, port), daemon=True).start()

    def _accept(self, ls, port):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = {"cut": False}
            threading.Thread(target=self._pump, args=(client, server, conn, port, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, conn, port, False),
                             daemon=True).start()

    def _pump(self, src, dst, conn, port, upstream):
        try:
            while data := src.recv(65536):
                if upstream and self.trigger in data:
                    with self._lock:
                        if self.armed.is_set():
                            self.armed.clear()
                            conn["cut"] = True
                            self.cuts.append(port)
                            threading.Timer(self.hold, _close, (src, dst)).start()
                if not upstream and conn["cut"]:
                    continue  # the answer never reaches the client
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not conn["cut"]:
                _close(src, dst)

    def close(self):
        for ls in self._listeners:
            ls.close()


def _close(*socks):
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def test_write_cut_off_after_the_server_made_it_is_retried_and_applied_once(cluster3):
    """The ambiguous failure: the server applied the put, the connection broke before
    the answer came back.  grpc retries it (UNAVAILABLE) with the same request id,
    and the cluster answers with the first version instead of writing a second one."""
    key = f"cut-{uuid.uuid4().hex[:8]}"
    proxies = CuttingProxies([s.port for s in cluster3.servers], trigger=b"cut-value-")
    try:
        with Client(proxies.addresses) as client:
            assert client.wait_ready(10)
            for i in range(3):
                assert client.put(key, f"before-{i}").version == i + 1
            proxies.armed.set()
            assert client.put(key, "cut-value-3").version == 4
            assert len(proxies.cuts) == 1, "the put was not cut off: nothing was tested"
            assert client.put(key, "after-4").version == 5
            values = sorted((v.version, v.value) for v in client.history(key).versions)
            assert values == [(1, "before-0"), (2, "before-1"), (3, "before-2"),
                              (4, "cut-value-3"), (5, "after-4")]
    finally:
        proxies.close()


def run_shell(args, tmp_path):
    env = dict(os.environ, KVS_SHELL_HISTORY=str(tmp_path / "hist"))
    return subprocess.run([sys.executable, "-m", "kvs_shell", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)


def test_round_robin_then_failover(cluster3, tmp_path):
    servers = cluster3.servers
    ports = ",".join(str(s.port) for s in servers)
    with Client([s.address for s in servers]) as client:
        assert client.wait_ready(10)
        for i in range(30):
            assert client.put("fo-key", f"value-{i}").version == i + 1
        # every version records the node it was written through
        nodes = {v.node for v in client.history("fo-key").versions}
        assert len(nodes) >= 2, f"all writes went through {nodes}: no round robin"
        dead = client.node_status(servers[0].address).node_id

        servers[0].kill()
        # every call keeps working through the two others
        for i in range(30, 60):
            assert client.put("fo-key", f"value-{i}").version == i + 1
            got = client.get("fo-key")
            assert (got.version, got.value) == (i + 1, f"value-{i}")
        for i in range(60, 70):  # puts only: they alternate over the two live servers
            assert client.put("fo-key", f"value-{i}").version == i + 1
        later = {v.node for v in client.history("fo-key").versions if v.version > 30}
        assert dead not in later and len(later) == 2, later

    r = run_shell(["--servers", ports, "-c", "put fo-key again; get fo-key; status"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "fo-key\t71" and lines[1] == "fo-key\t71\tagain"
    status = {l.split("\t")[0]: l.split("\t")[1] for l in lines[2:]}
    assert status[servers[0].address] == "down"
    assert status[servers[1].address] == status[servers[2].address] == "up"

    for s in servers[1:]:
        s.kill()
    r = run_shell(["--servers", ports, "-c", "get fo-key"], tmp_path)
    assert r.returncode == 1 and "unreachable" in r.stderr
    with Client([s.address for s in servers]) as client, pytest.raises(ServerUnavailable):
        client.get("fo-key")
