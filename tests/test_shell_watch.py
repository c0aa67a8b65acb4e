"""The shell's watch, export/import, compact and retention against real servers: watch in a
real terminal (tmux) with Ctrl-C back to the prompt; watch piped as JSON Lines across a
kill -9 of the server it watches (every acknowledged write once, in position order);
export -> import between two clusters and compact/retention, all through the shell.

Synchronisation is poll-with-deadline (``wait_until``); every process started here is
killed by PID at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import ROOT, wait_until

from kvs_shell.client import LINEARIZABLE, Client, ClientError

pytestmark = pytest.mark.integration


def shell_env(tmp_path) -> dict:
    env = dict(os.environ, KVS_SHELL_HISTORY=str(tmp_path / "hist"))
    env.pop("KVS_SHELL_SERVERS", None)
    return env


def run_shell(args, tmp_path, timeout=60):
    return subprocess.run([sys.executable, "-m", "kvs_shell", *args], capture_output=True,
                          text=True, cwd=ROOT, env=shell_env(tmp_path), timeout=timeout)


def kill_pid(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Lines:
    """Reads a pipe line by line in a thread; ``lines`` grows as output comes."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self, timeout=10):
        self._thread.join(timeout)


# ---------------------------------------------------------------------------
# (a) a real terminal: rows appear as keys are written, Ctrl-C returns to the prompt
# ---------------------------------------------------------------------------
def test_tmux_watch_shows_rows_live_and_ctrl_c_returns_to_the_prompt(cluster3, tmp_path):
    sock = f"kvs-watch-test-{os.getpid()}"
    ports = ",".join(str(s.port) for s in cluster3.servers)

    def tmux(*args, check=True):
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=check, timeout=10)

    def screen():
        return tmux("capture-pane", "-p", "-t", "kvs").stdout

    cmd = (f"env -u COLUMNS -u LINES KVS_SHELL_HISTORY={tmp_path}/hist TERM=xterm-256color "
           f"{sys.executable} -m kvs_shell --servers {ports}")
    tmux("-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "50", "-s", "kvs",
         "-c", str(ROOT), cmd)
    pane_pid = int(tmux("display-message", "-p", "-t", "kvs", "#{pane_pid}").stdout.strip())
    writer = Client(cluster3.addresses)
    try:
        wait_until(lambda: "kvs>" in screen(), 30, "the prompt")
        tmux("send-keys", "-t", "kvs", "-l", "watch twx/")
        tmux("send-keys", "-t", "kvs", "Enter")
        wait_until(lambda: "watching keys starting with 'twx/'" in screen(), 15,
                   "the watch to start")
        assert writer.put("twx/alpha", "first value").ok
        assert writer.put("other-key", "not watched").ok
        assert writer.put("twx/beta", "second value").ok
        assert writer.delete("twx/alpha").ok

        def rows():
            s = screen()
            lines = [l for l in s.splitlines() if "twx/" in l and l.lstrip()[:1].isdigit()]
            return lines if len(lines) >= 3 else None
        lines = wait_until(rows, 15, "three rows in the pane")
        assert "put" in lines[0] and "twx/alpha" in lines[0] and "first value" in lines[0]
        assert "put" in lines[1] and "twx/beta" in lines[1] and "second value" in lines[1]
        assert "del*" in lines[2] and "twx/alpha" in lines[2]
        assert "node-" in lines[0] and "other-key" not in screen(), screen()
        positions = [int(l.split()[0]) for l in lines]
        assert positions == sorted(positions)
        header = next(l for l in screen().splitlines() if l.lstrip().startswith("position"))
        assert header.split() == ["position", "time", "op", "key", "version", "node", "value"]

        tmux("send-keys", "-t", "kvs", "C-c")
        wait_until(lambda: "watch stopped after 3 changes" in screen(), 15, "the watch to stop")
        wait_until(lambda: screen().rstrip().splitlines()[-2:] and any(
            l.startswith("kvs>") for l in screen().split("watch stopped", 1)[1].splitlines()),
            15, "the prompt back after the watch")
        tmux("send-keys", "-t", "kvs", "-l", "get twx/beta")
        tmux("send-keys", "-t", "kvs", "Enter")
        wait_until(lambda: 'twx/beta = "second value"' in screen(), 15,
                   "a command after the watch")
        tmux("send-keys", "-t", "kvs", "C-d")
        wait_until(lambda: tmux("has-session", "-t", "kvs", check=False).returncode != 0, 15,
                   "the shell to exit on Ctrl-D")
    finally:
        writer.close()
        kill_pid(pane_pid)
        tmux("kill-server", check=False)


# ---------------------------------------------------------------------------
# (b) piped: JSON Lines across a kill -9 of the watched server
# ---------------------------------------------------------------------------
def test_piped_watch_survives_kill_9_of_its_server_with_every_write_once(tmp_path):
    from kvs_cluster import Cluster

    with Cluster(n=3, workdir=tmp_path / "c") as cluster:
        cluster.wait_ready(60)
        ports = ",".join(str(s.port) for s in cluster.servers)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvs_shell", "--servers", ports, "-c", "watch pw/"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=shell_env(tmp_path))
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        writer = Client(cluster.addresses, timeout=10)
        written: list[tuple] = []
        run = uuid.uuid4().hex[:8]

        def change(i: int) -> bool:
            """One change, retried under one request id: applied once whatever happens."""
            key = f"pw/{i % 5:03d}"
            rid = f"pw-{run}-{i:04d}"
            try:
                if i % 7 == 6:  # now and then remove the key's newest version
                    [w] = writer.mdel([(key, None)], request_id=rid)
                    op, value = "remove", None
                else:
                    [w] = writer.mput([(key, f"value-{i}")], request_id=rid)
                    op, value = "put", f"value-{i}"
            except ClientError:
                return False
            if w.ok:
                written.append((op, key, w.version, value))
            return w.ok or not w.no_quorum  # a refused remove (nothing left) is an answer

        def seen():
            return [json.loads(l) for l in list(out.lines)]

        try:
            started = wait_until(lambda: next((l for l in err.lines if l.startswith("watching")),
                                              None), 30, "the watch to start")
            node = started.split(" on ", 1)[1].split()[0]
            by_node = {writer.node_status(s.address).node_id: s for s in cluster.servers}
            assert node in by_node, (node, list(by_node))
            for i in range(20):
                wait_until(lambda: change(i), 30, f"change {i}")
            wait_until(lambda: len(seen()) >= len(written), 20, "the first changes piped")

            by_node[node].kill()  # SIGKILL of the server the watch is on; writes go on
            for i in range(20, 45):
                wait_until(lambda: change(i), 60, f"change {i} after the kill")
            wait_until(lambda: len(seen()) >= len(written), 60, "every change after the kill")
            docs = seen()
            assert [(d["op"], d["key"], d["version"], d["value"]) for d in docs] == written
            positions = [d["position"] for d in docs]
            assert positions == sorted(set(positions)), "each change once, in position order"
            assert set(docs[0]) == {"position", "op", "key", "version", "value", "node",
                                    "written_at", "all_versions"}
            resumed = [l for l in err.lines if l.startswith("resumed on ")]
            assert resumed and node not in resumed[0], err.text()
            assert any(l.startswith("reconnecting") for l in err.lines)

            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0, err.text()
            out.join()
            err.join()
            assert f"watch stopped after {len(written)} changes" in err.text()
            assert "error" not in err.text() and len(seen()) == len(written)
        finally:
            kill_pid(proc.pid if proc.poll() is None else None)
            proc.wait(timeout=10)
            writer.close()


def test_piped_watch_ends_cleanly_on_sigterm(cluster3, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvs_shell", "--servers",
         ",".join(str(s.port) for s in cluster3.servers), "--format", "json",
         "-c", "watch st/; put st/never-run vvv"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=shell_env(tmp_path))
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        wait_until(lambda: any(l.startswith("watching") for l in err.lines), 30, "the watch")
        with Client(cluster3.addresses) as c:
            assert c.put("st/one", "first").ok
        doc = json.loads(wait_until(lambda: out.lines and out.lines[0], 15, "the change"))
        assert (doc["op"], doc["key"], doc["value"]) == ("put", "st/one", "first")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        out.join()
        err.join()
        assert len(out.lines) == 1  # the script ended with the watch
        assert "watch stopped after 1 change" in err.text()
    finally:
        kill_pid(proc.pid if proc.poll() is None else None)
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------
# (c) export -> import, compact and retention through the shell
# ---------------------------------------------------------------------------
def _history_of(client: Client, prefix: str) -> dict:
    return {k.key: [(v.version, v.value) for v in k.versions]
            for _pos, k in client.export(prefix, consistency=LINEARIZABLE)}


def test_export_import_compact_and_retention_through_the_shell(cluster3, solo, tmp_path):
    src_port = str(cluster3.servers[0].port)
    dst_port = str(solo.servers[0].port)
    with Client(cluster3.addresses) as src:
        for i in range(1, 4):
            assert src.put("xio/a", f"a-{i}").ok
        for i in range(1, 6):
            assert src.put("xio/b", f"b-{i}").ok
        assert src.delete("xio/b", 2).ok and src.delete("xio/b", 5).ok  # gaps, last removed
        assert src.put("xio/c", "only one").ok
        assert src.put("other/x", "not exported").ok
        wait_until(lambda: _history_of(src, "xio/").get("xio/c"), 10, "the writes applied")
        expected = _history_of(src, "xio/")
    assert expected == {"xio/a": [(1, "a-1"), (2, "a-2"), (3, "a-3")],
                        "xio/b": [(1, "b-1"), (3, "b-3"), (4, "b-4")],
                        "xio/c": [(1, "only one")]}

    path = tmp_path / "dump.jsonl"
    r = run_shell(["-p", src_port, "-c", f"export {path} xio/"], tmp_path)
    assert r.returncode == 0, r.stderr
    fpath, position, keys, versions, size = r.stdout.rstrip("\n").split("\t")
    assert (fpath, keys, versions, int(size)) == (str(path), "3", "7", path.stat().st_size)
    assert json.loads(path.read_text().splitlines()[0])["position"] == int(position) > 0

    r = run_shell(["-p", dst_port, "--format", "json", "-c", f"import {path}"], tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["complete"] and (rec["keys"], rec["versions"], rec["renumbered"]) == (3, 7, 0)
    assert rec["placeholders"] == 1  # b@2 filled, then removed (b@5 came after the last)
    with Client(solo.addresses) as dst:
        assert _history_of(dst, "xio/") == expected
        assert dst.get("xio/b", 2).version == 1  # the contract's reads agree

        # a file that is not an export: the line is named, nothing is written
        bad = tmp_path / "bad.jsonl"
        bad.write_text(path.read_text().replace('"version":3', '"version":"3"'))
        before = dst.retention().position
        r = run_shell(["-p", dst_port, "-c", f"import {bad}"], tmp_path)
        assert r.returncode == 1 and r.stdout == ""
        assert "not a valid export file: line 4: 'version' must be an integer" in r.stderr
        assert dst.retention().position == before

        # retention: show, compact at the current position, then keep 1 version
        r = run_shell(["-p", dst_port, "--format", "json", "-c", "retention"], tmp_path)
        info = json.loads(r.stdout)
        assert (info["keep_versions"], info["compacted"]) == (0, 0) and info["position"] > 7

        # TAB offers the current position for compact
        from prompt_toolkit.completion import CompleteEvent
        from prompt_toolkit.document import Document
        from kvs_shell.completer import KVSCompleter
        comp = KVSCompleter(lambda: dst)
        offered = [c.text for c in comp.get_completions(Document("compact "), CompleteEvent())]
        assert offered == [str(info["position"])]

        r = run_shell(["-p", dst_port, "--format", "json", "-c",
                       f"compact {info['position']}"], tmp_path)
        assert r.returncode == 0, r.stderr
        done = json.loads(r.stdout)
        assert done["compacted"] == info["position"] and done["dropped"] == 4  # a@1,2 b@1,3
        assert _history_of(dst, "xio/") == {"xio/a": [(3, "a-3")], "xio/b": [(4, "b-4")],
                                            "xio/c": [(1, "only one")]}
        r = run_shell(["-p", dst_port, "-c", f"compact {info['position']}"], tmp_path)
        assert r.returncode == 1 and (f"error: compact {info['position']}: compacted: already "
                                      f"compacted at position {info['position']}") in r.stderr

        # a watch from before the compaction: the oldest position, and what to do
        r = run_shell(["-p", dst_port, "-c", "watch xio/ --from 1"], tmp_path)
        assert r.returncode == 1 and r.stdout == ""
        assert "position 1 is compacted" in r.stderr
        assert f"the oldest position the servers still have is {done['oldest_watch']}" \
            in r.stderr and "--from` P+1" in r.stderr

        assert dst.put("xio/c", "second one").ok
        r = run_shell(["-p", dst_port, "-c", "retention 1; retention"], tmp_path)
        assert r.returncode == 0, r.stderr
        set_line, show_line = r.stdout.splitlines()
        assert set_line.split("\t")[0] == "1" and set_line.split("\t")[4] == "1"  # c@1 went
        assert show_line.split("\t")[:2] == ["1", str(info["position"])]
        wait_until(lambda: _history_of(dst, "xio/")["xio/c"] == [(2, "second one")], 10,
                   "retention applied")
        assert run_shell(["-p", dst_port, "-c", "retention 0"], tmp_path).returncode == 0
