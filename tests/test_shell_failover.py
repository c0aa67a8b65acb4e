"""kvs_shell with --servers: round robin over the cluster and failover when servers die."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

from kvs_shell.client import Client, ServerUnavailable

pytestmark = pytest.mark.integration


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
