"""kvs_shell against a real 3-server cluster: pipe mode and exit codes (subprocesses),
client.sh flag compatibility, and the prompt_toolkit UI in-process (pipe input, dummy output):
completion of keys and versions, Ctrl-C, Ctrl-D, history table."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_until

from kvs_shell.app import Shell
from kvs_shell.client import Client

pytestmark = pytest.mark.integration


def run_shell(args, stdin=None, tmp_path=None, timeout=30):
    env = dict(os.environ)
    env["KVS_SHELL_HISTORY"] = str((tmp_path or Path("/tmp")) / "kvs_shell_history")
    env.pop("KVS_SHELL_SERVERS", None)
    return subprocess.run([sys.executable, "-m", "kvs_shell", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def port(cluster3):
    return str(cluster3.servers[0].port)


@pytest.fixture(scope="module")
def ports(cluster3):
    return ",".join(str(s.port) for s in cluster3.servers)


# ---------------------------------------------------------------------------
# pipe mode, -c, --file, exit codes
# ---------------------------------------------------------------------------
def test_pipe_mode_plain_results_and_exit_0(port, tmp_path):
    script = ('put pipe-a "hello world"\nput pipe-a second\n'
              "get pipe-a\nget pipe-a 1\nget pipe-missing\nhistory pipe-a\n")
    r = run_shell(["-p", port], stdin=script, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:5] == ["pipe-a\t1", "pipe-a\t2", "pipe-a\t2\tsecond", "pipe-a\t1\thello world",
                         "pipe-missing\t(not found)"]
    assert lines[5].startswith("2\tsecond\tnode-") and lines[6].startswith("1\thello world\t")
    assert "\x1b[" not in r.stdout and "kvs>" not in r.stdout and "KVS shell" not in r.stdout
    assert r.stderr == ""


def test_invalid_input_fails_and_stops_at_first_error(port, tmp_path):
    r = run_shell(["-p", port], stdin="put stop-a val\nget xy\nput stop-b val\n", tmp_path=tmp_path)
    assert r.returncode == 1
    assert r.stdout == "stop-a\t1\n"
    assert "invalid key 'xy'" in r.stderr
    r = run_shell(["-p", port, "-c", "get stop-b"], tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout == "stop-b\t(not found)\n"


def test_continue_on_error(port, tmp_path):
    r = run_shell(["-p", port, "--continue-on-error"],
                  stdin="put cont-a val\nget xy\nput cont-b val\n", tmp_path=tmp_path)
    assert r.returncode == 1
    assert r.stdout == "cont-a\t1\ncont-b\t1\n"


def test_server_refusal_shows_the_reason_and_fails(port, tmp_path):
    r = run_shell(["-p", port, "-c", "del never-written-key"], tmp_path=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("error: del never-written-key: refused by the server: ")
    reason = r.stderr.split("refused by the server: ", 1)[1].strip()
    assert reason and reason != "(no reason given)"  # the server's own words (kvs-error)


def test_one_shot_commands_json(port, tmp_path):
    r = run_shell(["-p", port, "--format", "json", "-c",
                   "put json-a v1v; put json-a v2v; get json-a 1; mget json-a json-a@1 json-nope; "
                   "keys json-"], tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert docs[0] == {"op": "put", "key": "json-a", "version": 1, "ok": True}
    assert docs[2]["version"] == 1 and docs[2]["value"] == "v1v" and docs[2]["requested"] == 1
    assert [d["version"] for d in docs[3:6]] == [2, 1, 0]
    assert docs[5]["found"] is False
    assert docs[6] == {"prefix": "json-", "keys": ["json-a"]}


def test_script_file_with_quotes_and_comments(port, tmp_path):
    script = tmp_path / "script.kvs"
    script.write_text("# set up\nmput file-a 'one value' file-b \"two; values\"  # trailing\n"
                      "\nmget file-a file-b; mdel file-a\nsnapshot\n")
    r = run_shell(["-p", port, "--file", str(script)], tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:5] == ["file-a\t1", "file-b\t1", "file-a\t1\tone value", "file-b\t1\ttwo; values",
                       "file-a\t1"]
    assert "file-b\t1\ttwo; values" in out[5:] and not any(l.startswith("file-a") for l in out[5:])


def test_status_lists_every_server(cluster3, port, tmp_path):
    r = run_shell(["-p", port, "-c", "status"], tmp_path=tmp_path)  # one given, peers found
    assert r.returncode == 0, r.stderr
    rows = [l.split("\t") for l in r.stdout.splitlines()]
    assert sorted(row[0] for row in rows) == sorted(s.address for s in cluster3.servers)
    for row in rows:
        assert row[1] == "up" and row[2].startswith("node-") and row[5].isdigit()


def test_unreachable_server_is_a_clear_failure(tmp_path):
    dead = str(free_port())
    t0 = time.monotonic()
    r = run_shell(["-p", dead], stdin="get some-key\n", tmp_path=tmp_path)
    assert r.returncode == 1
    assert f"127.0.0.1:{dead} is unreachable" in r.stderr
    assert time.monotonic() - t0 < 15


def test_bad_server_list_is_a_usage_error(tmp_path):
    r = run_shell(["--servers", "90a0"], stdin="", tmp_path=tmp_path)
    assert r.returncode == 2 and "port" in r.stderr


# ---------------------------------------------------------------------------
# client.sh
# ---------------------------------------------------------------------------
def client_sh(*args):
    return subprocess.run([str(ROOT / "client.sh"), *args], capture_output=True, text=True,
                          timeout=30)


def test_client_sh_single_operations(port):
    r = client_sh("-p", port, "-o", "insere", "-k", "csh-one", "-v", "first")
    assert (r.returncode, r.stdout) == (0, "Versao { versao: 1 }\n"), r.stderr
    client_sh("-p", port, "-o", "insere", "-k", "csh-one", "-v", "second")
    r = client_sh("-p", port, "-o", "consulta", "-k", "csh-one", "-e", "1")
    assert r.stdout == 'Tupla { chave: "csh-one", valor: "first", versao: 1 }\n'
    r = client_sh("-p", port, "-o", "consulta", "-k", "csh-one")
    assert r.stdout == 'Tupla { chave: "csh-one", valor: "second", versao: 2 }\n'
    r = client_sh("-p", port, "-o", "remove", "-k", "csh-one", "-e", "1")
    assert (r.returncode, r.stdout) == (0, "Versao { versao: 1 }\n")
    r = client_sh("-p", port, "-o", "remove", "-k", "csh-one", "-e", "1")
    assert r.returncode == 1 and r.stdout == "Versao { versao: -1 }\n" and "kvs-error" in r.stderr


def test_client_sh_batches_accept_both_flag_styles(port):
    # several values after one flag
    r = client_sh("-p", port, "-o", "insere-v", "-k", "csh-b1", "csh-b2", "-v", "vb1", "vb2")
    assert r.stdout == "Versao { versao: 1 }\nVersao { versao: 1 }\n", r.stderr
    # repeated flags
    r = client_sh("-p", port, "-o", "insere-v", "-k", "csh-b1", "-v", "vb1-2", "-k", "csh-b3",
                  "-v", "vb3")
    assert r.stdout == "Versao { versao: 2 }\nVersao { versao: 1 }\n"
    r = client_sh("-p", port, "-o", "consulta-v", "-k", "csh-b1", "-k", "csh-b1", "csh-b2",
                  "-e", "1", "-e", "0")
    assert r.stdout.splitlines() == ['Tupla { chave: "csh-b1", valor: "vb1", versao: 1 }',
                                     'Tupla { chave: "csh-b1", valor: "vb1-2", versao: 2 }',
                                     'Tupla { chave: "csh-b2", valor: "vb2", versao: 1 }']
    r = client_sh("-p", port, "-o", "remove-v", "-k", "csh-b2", "csh-b3")
    assert (r.returncode, r.stdout) == (0, "Versao { versao: 1 }\nVersao { versao: 1 }\n")
    r = client_sh("-p", port, "-o", "snapshot")
    assert 'Tupla { chave: "csh-b1", valor: "vb1-2", versao: 2 }' in r.stdout.splitlines()
    assert "csh-b2" not in r.stdout


def test_client_sh_bad_flags():
    r = client_sh("-p", "1", "-o", "frobnicate")
    assert r.returncode == 2 and "unknown operation" in r.stderr


# ---------------------------------------------------------------------------
# the interactive shell in-process: pipe input + dummy output
# ---------------------------------------------------------------------------
class UI:
    """Runs Shell.run_interactive in the main thread while a driver thread types."""

    def __init__(self, addresses, tmp_path, monkeypatch):
        from prompt_toolkit.input import create_pipe_input
        from prompt_toolkit.output import DummyOutput

        monkeypatch.setenv("KVS_SHELL_HISTORY", str(tmp_path / "hist"))
        self.out = io.StringIO()
        self.shell = Shell(addresses, fmt="table", interactive=True, out=self.out,
                           err=self.out, color=False, width=120)
        self._input_cm = create_pipe_input()
        self.inp = self._input_cm.__enter__()
        self.session = self.shell.make_session(input=self.inp, output=DummyOutput())
        self.errors: list[BaseException] = []

    @property
    def buffer(self):
        return self.session.app.current_buffer

    def type(self, text):
        self.inp.send_text(text)

    def run(self, script, timeout=30):
        """``script(ui)`` runs in a thread; the shell runs here until Ctrl-D."""
        def driver():
            try:
                wait_until(lambda: self.session.app.is_running, 10, "prompt running")
                script(self)
            except BaseException as exc:  # noqa: BLE001 - reported below
                self.errors.append(exc)
            finally:
                self.type("\x03\x04")  # make sure the shell ends: Ctrl-C, Ctrl-D
        t = threading.Thread(target=driver, daemon=True)
        t.start()
        code = self.shell.run_interactive(banner=False)
        t.join(timeout)
        self._input_cm.__exit__(None, None, None)
        self.shell.close()
        if self.errors:
            raise self.errors[0]
        return code


def test_ui_completes_keys_then_shows_history_table(cluster3, tmp_path, monkeypatch):
    with Client([cluster3.servers[1].address]) as c:
        for v in ("red", "green", "blue"):
            c.put("uikey-colour", v)
        c.put("uikey-other", "zzz")
    ui = UI([cluster3.servers[0].address], tmp_path, monkeypatch)

    def script(ui):
        ui.type("history uikey-c")
        # completion while typing runs in a thread (first use of a prefix asks the server)
        wait_until(lambda: ui.buffer.text == "history uikey-c" and ui.buffer.complete_state
                   and ui.buffer.complete_state.completions, 15, "completion menu")
        ui.type("\t")
        wait_until(lambda: ui.buffer.text == "history uikey-colour", 10,
                   "TAB completing the only key with that prefix")
        ui.type("\r")
        wait_until(lambda: "history of uikey-colour" in ui.out.getvalue(), 10, "history table")
        # version completion: newest first, value preview as meta
        ui.type("get uikey-colour ")
        ui.type("\t")
        state = wait_until(lambda: ui.buffer.complete_state and
                           ui.buffer.complete_state.completions, 10, "version completions")
        assert [c.display_text for c in state] == ["3", "2", "1"]
        assert [c.display_meta_text for c in state] == ["blue", "green", "red"]
        # Ctrl-C clears the line, the shell keeps running
        ui.type("\x03")
        wait_until(lambda: ui.buffer.text == "", 10, "Ctrl-C clearing the line")
        ui.type("get uikey-colour 2\r")
        wait_until(lambda: "answered by version 2" in ui.out.getvalue()
                   or "(version 2)" in ui.out.getvalue(), 10, "get answer")
        ui.type("\x04")  # Ctrl-D on an empty line exits

    assert ui.run(script) == 0
    out = ui.out.getvalue()
    for v in ("red", "green", "blue", "version", "size", "node", "written"):
        assert v in out
    hist = (tmp_path / "hist").read_text()
    assert "history uikey-colour" in hist and "get uikey-colour 2" in hist


def test_ui_key_cache_follows_writes(cluster3, tmp_path, monkeypatch):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    shell = Shell([cluster3.servers[2].address], fmt="plain", out=io.StringIO(),
                  err=io.StringIO())
    comp = shell.completer

    def keys(prefix):
        return [c.display_text for c in comp.get_completions(Document(f"get {prefix}"),
                                                             CompleteEvent())]
    try:
        assert keys("cachekey-") == []
        assert shell.run_line("put cachekey-one v11; put cachekey-two v22")
        assert keys("cachekey-") == ["cachekey-one", "cachekey-two"]  # at once, no listing
        assert shell.run_line("del cachekey-one")
        assert comp.refresher.wait_idle(10)  # background refresh after the write
        assert keys("cachekey-") == ["cachekey-two"]
        # a key written elsewhere shows up after the next refresh triggered by a write
        with Client([cluster3.servers[0].address]) as other:
            other.put("cachekey-three", "v33")
        wait_until(lambda: shell.client.get("cachekey-three").found, 10, "replication")
        assert shell.run_line("put cachekey-four v44")
        assert comp.refresher.wait_idle(10)
        assert keys("cachekey-t") == ["cachekey-three", "cachekey-two"]
    finally:
        shell.close()


def test_connect_switches_servers(cluster3, tmp_path):
    out = io.StringIO()
    shell = Shell([f"127.0.0.1:{free_port()}"], fmt="plain", out=out, err=out,
                  continue_on_error=True)
    try:
        assert not shell.run_line("get conn-key")
        assert "unreachable" in out.getvalue()
        ports = ",".join(str(s.port) for s in cluster3.servers)
        assert shell.run_line(f"connect {ports}; put conn-key vvv; get conn-key")
        assert "connected to" in out.getvalue() and "conn-key\t1\tvvv" in out.getvalue()
        assert len(shell.client.addresses) == 3
    finally:
        shell.close()


# ---------------------------------------------------------------------------
# a real terminal: tmux
# ---------------------------------------------------------------------------
def test_tmux_tab_completion_and_history_table(cluster3, tmp_path):
    with Client([cluster3.servers[0].address]) as c:
        c.put("tmxkey-alpha", "first value")
        c.put("tmxkey-alpha", "second value")
        c.put("tmxkey-beta", "other")
    sock = f"kvs-shell-test-{os.getpid()}"
    port = cluster3.servers[1].port

    def tmux(*args, check=True):
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=check, timeout=10)

    def screen():
        return tmux("capture-pane", "-p", "-t", "kvs").stdout

    cmd = (f"env KVS_SHELL_HISTORY={tmp_path}/hist TERM=xterm-256color "
           f"{sys.executable} -m kvs_shell -p {port}")
    tmux("-f", "/dev/null", "new-session", "-d", "-x", "200", "-y", "50", "-s", "kvs",
         "-c", str(ROOT), cmd)
    try:
        wait_until(lambda: "kvs>" in screen(), 30, "the prompt")
        tmux("send-keys", "-t", "kvs", "-l", "history tmxkey-al")
        wait_until(lambda: "kvs> history tmxkey-al" in screen(), 10, "typed text")
        wait_until(lambda: screen().count("tmxkey-alpha") >= 1, 15, "completion menu")
        tmux("send-keys", "-t", "kvs", "Tab")
        wait_until(lambda: "kvs> history tmxkey-alpha" in screen(), 15, "TAB completion")
        tmux("send-keys", "-t", "kvs", "Enter")
        def table():
            s = screen()
            ok = "history of tmxkey-alpha" in s and "second value" in s and "first value" in s
            return s if ok else ""
        text = wait_until(table, 15, "history table")
        assert "version" in text and "node" in text and "written" in text
        assert any(ch in text for ch in "│┃|")  # a drawn table
        assert "node-" in text
        # bottom toolbar: server, connection state, latency of the last command
        wait_until(lambda: "server 127.0.0.1:" in (s := screen()) and "connected" in s
                   and " ms" in s, 15, "bottom toolbar")
        tmux("send-keys", "-t", "kvs", "C-d")
        wait_until(lambda: tmux("has-session", "-t", "kvs", check=False).returncode != 0, 15,
                   "the shell to exit on Ctrl-D")
    finally:
        tmux("kill-server", check=False)


# ---------------------------------------------------------------------------
# History paging, diff and get --at against the real cluster
# ---------------------------------------------------------------------------
def _settled(c: Client, key: str, top: int) -> None:
    """Wait until the server ``c`` reads from has applied ``key``'s version ``top``."""
    wait_until(lambda: [v.version for v in c.history(key, limit=1).versions] == [top], 20,
               f"{key}@{top} applied")


def test_history_pages_by_count_and_by_bytes(cluster3, port, tmp_path):
    from conftest import stub
    from kvs_proto import kvs_pb2

    key = "page-key"
    with Client([cluster3.servers[0].address]) as c:
        for i in range(1, 31):
            assert c.put(key, f"value-{i:02d}").version == i
        _settled(c, key, 30)
        first = c.history(key, limit=25)
        assert [v.version for v in first.versions] == list(range(30, 5, -1))
        assert first.more is True and first.max_version == 30
        rest = c.history(key, limit=25, before_version=first.versions[-1].version)
        assert [v.version for v in rest.versions] == [5, 4, 3, 2, 1] and rest.more is False
        assert [v.value for v in rest.versions] == [f"value-{i:02d}" for i in (5, 4, 3, 2, 1)]
        # a removed version is skipped, and a page ending just above it says more
        assert c.delete(key, 3).version == 3
        wait_until(lambda: 3 not in [v.version for v in c.history(key).versions], 20)
        page = c.history(key, limit=2, before_version=5)
        assert [v.version for v in page.versions] == [4, 2] and page.more is True
        assert c.history(key, limit=1, before_version=2).more is False

        # no limit: the server's default (1000) covers all of them in one answer
        raw = stub(cluster3.servers[0].address).ext.History(
            kvs_pb2.HistoryRequest(chave=key), timeout=10)
        assert len(raw.versions) == 29 and raw.more is False

        # values of 1.5 MiB: a page holds one (2 MiB of values per page), whatever the limit
        big = "big-key"
        values = [chr(ord("a") + i) * (3 * 512 * 1024) for i in range(3)]
        for i, v in enumerate(values, 1):
            assert c.put(big, v).version == i
        _settled(c, big, 3)
        seen, before, pages = [], 0, 0
        while True:
            h = c.history(big, limit=10, before_version=before)
            pages += 1
            assert len(h.versions) == 1, "a page is cut at 2 MiB of values"
            seen += [(v.version, v.value) for v in h.versions]
            if not h.more:
                break
            before = h.versions[-1].version
        assert pages == 3 and seen == [(3, values[2]), (2, values[1]), (1, values[0])]

        # the shell's history pages too: --limit 25 shows the 25 newest
        r = run_shell(["-p", port, "--format", "json", "-c", f"history {big}; history {key} --limit 25"],
                      tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
        docs = [json.loads(line) for line in r.stdout.splitlines()]
        assert [v["version"] for v in docs[0]["versions"]] == [3, 2, 1] and not docs[0]["more"]
        assert [v["version"] for v in docs[1]["versions"]] == list(range(30, 5, -1))
        assert docs[1]["more"] is True


def test_diff_and_get_at_through_the_shell(cluster3, port, tmp_path):
    import datetime as dt

    key = "tt-user"
    docs = [{"name": "Ada", "langs": ["en"], "age": 36},
            {"name": "Ada", "langs": ["en", "fr"], "age": 36},
            {"name": "Ada Lovelace", "langs": ["en", "fr"], "age": 36}]
    with Client([cluster3.servers[0].address]) as c:
        stamps = []
        for i, d in enumerate(docs, 1):
            assert c.put(key, json.dumps(d)).version == i
            _settled(c, key, i)
            stamps.append(c.history(key, limit=1).versions[0].written_at)
            # the next write must be later than a time picked between the two
            wait_until(lambda: time.time() > stamps[-1] + 0.2, 5, "the clock moved on")

    def iso(ts):
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()

    script = (f"diff {key} 1 2\ndiff {key} 2\n"
              f"get {key} --at {iso(stamps[1] + 0.1)}\n"
              f"get {key} --at {iso(stamps[0] - 5)}\n"
              f"get {key} --at 0s ago\n")
    r = run_shell(["-p", port], stdin=script, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    first = lines[:lines.index(f"--- {key}@2")]
    assert first[:2] == [f"--- {key}@1", f"+++ {key}@2"]
    changed = [l for l in first[2:] if l[:1] in "+-"]
    assert changed == ['-    "en"', '+    "en",', '+    "fr"']  # pretty-printed JSON fields
    second = lines[lines.index(f"--- {key}@2"):-3]
    assert [l for l in second[2:] if l[:1] in "+-"] == ['-  "name": "Ada"', '+  "name": "Ada Lovelace"']
    assert lines[-3] == f"{key}\t2\t{json.dumps(docs[1])}"
    assert lines[-2] == f"{key}\t(not found)"
    assert lines[-1] == f"{key}\t3\t{json.dumps(docs[2])}"

    r = run_shell(["-p", port, "-c", f"diff {key} 1 7"], tmp_path=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (f"error: diff {key}: version 7: not live (removed, or never "
                                "written; highest ever 3)")
    r = run_shell(["-p", port, "--format", "json", "-c", f"get {key} --at 1h ago"],
                  tmp_path=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["found"] is False
