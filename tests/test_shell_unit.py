"""kvs_shell without a server: parser, command table, validation, renderers, completer caches,
lexer, client.sh flags and address parsing."""
from __future__ import annotations

import io
import json
import re
import threading
import time
from types import SimpleNamespace

import pytest

from fakes import FakeRpcError

from kvs_shell import client as client_mod
from kvs_shell import commands as C
from kvs_shell.client import BadTarget, KeyList, Read, Written, Client, parse_servers
from kvs_shell.compat import FlagError, parse_flags
from kvs_shell import views as V
from kvs_shell.completer import KeyIndex, KeyRefresher, KVSCompleter
from kvs_shell.lexer import highlight
from kvs_shell.parser import ParseError, current_command, quote, split_commands, tokenize
from kvs_shell.render import Renderer
from kvs_shell.views import elide, esc_plain


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("line,expected", [
    ("put k1 v1", [["put", "k1", "v1"]]),
    ('put key "a b c"', [["put", "key", "a b c"]]),
    ("put key 'it''s'", [["put", "key", "its"]]),
    ("put k1 v1; get k1", [["put", "k1", "v1"], ["get", "k1"]]),
    ("put k1 v1;get k1;;", [["put", "k1", "v1"], ["get", "k1"]]),
    ("get k1 # a comment; get k2", [["get", "k1"]]),
    ("# only a comment", []),
    ("put abc a#b", [["put", "abc", "a#b"]]),
    ('put abc "x;y # z"', [["put", "abc", "x;y # z"]]),
    (r'put abc "q\"uote\n"', [["put", "abc", 'q"uote\n']]),
    (r"put abc a\ b", [["put", "abc", "a b"]]),
    ("put abc ''", [["put", "abc", ""]]),
    ("   ", []),
])
def test_split_commands(line, expected):
    assert split_commands(line) == expected


@pytest.mark.parametrize("line", ['put k "open', "put k 'open"])
def test_unterminated_quote_is_an_error(line):
    with pytest.raises(ParseError):
        split_commands(line)
    toks = tokenize(line, strict=False)  # while typing it is fine
    assert toks[-1].closed is False


def test_tokens_keep_positions():
    line = 'put  "a b" c; get'
    toks = tokenize(line)
    assert [(t.kind, line[t.start:t.end]) for t in toks] == [
        ("word", "put"), ("word", '"a b"'), ("word", "c"), ("sep", ";"), ("word", "get")]


def test_current_command_for_completion():
    words, new = current_command("put k1 v1; get ab")
    assert [w.text for w in words] == ["get", "ab"] and new is False
    words, new = current_command("get abc ")
    assert [w.text for w in words] == ["get", "abc"] and new is True
    words, new = current_command("put k1 v1;")
    assert words == [] and new is True
    words, new = current_command('put "a b')
    assert [w.text for w in words] == ["put", "a b"] and new is False


@pytest.mark.parametrize("word", ["plain", "a b", "it's", 'say "hi"', "x;y", "#tag", "tab\there", ""])
def test_quote_round_trips(word):
    assert split_commands(f"put {quote(word)}") == [["put", word]] if word else True
    assert [t.text for t in tokenize(quote(word))] == [word]


# ---------------------------------------------------------------------------
# command table and validation (fake client)
# ---------------------------------------------------------------------------
class FakeClient:
    addresses = ["127.0.0.1:9000"]

    def __init__(self):
        self.calls = []

    def put(self, k, v):
        self.calls.append(("put", k, v))
        return Written(k, 7, value=v)

    def get(self, k, v=None):
        self.calls.append(("get", k, v))
        return Read(k, "", 0, v) if k == "missing" else Read(k, "val", 2, v)

    def delete(self, k, v=None):
        self.calls.append(("del", k, v))
        return Written(k, -1, "key 'x' is unknown", requested=v)

    def mput(self, pairs):
        self.calls.append(("mput", pairs))
        return [Written(k, 1, value=v) for k, v in pairs]

    def mget(self, items):
        self.calls.append(("mget", items))
        return [Read(k, "val", 1, v) for k, v in items]

    def mdel(self, items):
        self.calls.append(("mdel", items))
        return [Written(k, 1 if i == 0 else -1, "" if i == 0 else "nope", requested=v)
                for i, (k, v) in enumerate(items)]


class Ctx:
    def __init__(self):
        self.client = FakeClient()
        self.timing = False
        self.written = []
        self.exited = False
        self.nodes = None  # what the last command showed for NODE completion

    def connect(self, spec):
        return f"connected to {spec}"

    def wrote(self, keys):
        self.written.extend(["*"] if keys is None else keys)  # None: keys not known

    def request_exit(self):
        self.exited = True

    def saw_nodes(self, nodes):
        self.nodes = list(nodes)


def test_every_command_has_help_text():
    names = set()
    for cmd in C.COMMANDS:
        assert cmd.syntax.startswith(cmd.name) and cmd.summary and cmd.meaning and cmd.example
        assert C.lookup(cmd.example.split()[0]) is cmd, cmd.example
        for n in cmd.names:
            assert n not in names, f"duplicate name {n}"
            names.add(n)
    for alias, name in [("insere", "put"), ("consulta", "get"), ("remove", "del"),
                        ("insere-v", "mput"), ("consulta-v", "mget"), ("remove-v", "mdel"),
                        ("quit", "exit")]:
        assert C.lookup(alias).name == name


@pytest.mark.parametrize("words,message", [
    (["put", "ab", "value"], "invalid key 'ab'"),
    (["put", "abc", "va"], "invalid value 'va'"),
    (["put", "abc"], "usage: put KEY VALUE"),
    (["get", "abc", "x"], "invalid version 'x'"),
    (["get", "abc", "0"], "invalid version 0"),
    (["get", "abc", "-3"], "invalid version -3"),
    (["get", "abc", "99999999999"], "invalid version"),
    (["mput", "k01", "v01", "k02"], "pairs"),
    (["mget", "k01", "ab@2"], "invalid key 'ab'"),
    (["timing", "maybe"], "usage: timing on|off"),
    (["frobnicate"], "unknown command"),
    (["help", "frobnicate"], "unknown command"),
    (["status", "extra"], "usage: status"),
])
def test_invalid_input_is_refused_before_any_call(words, message):
    ctx = Ctx()
    with pytest.raises(C.UsageError, match=message):
        C.run(ctx, words)
    assert ctx.client.calls == []


def test_handlers_map_to_client_calls():
    ctx = Ctx()
    assert C.run(ctx, ["insere", "abc", "hello world"]).records[0]["version"] == 7
    assert C.run(ctx, ["get", "abc", "3"]).ok
    miss = C.run(ctx, ["get", "missing"])
    assert miss.ok and not miss.records[0]["found"]  # not found is a normal answer
    out = C.run(ctx, ["del", "abc"])
    assert not out.ok and "unknown" in out.error  # -1 from the server: failed, with the reason
    C.run(ctx, ["mput", "k01", "v01", "k02", "v02"])
    C.run(ctx, ["mget", "k01", "k02@3", "user@example.com"])
    md = C.run(ctx, ["mdel", "k01", "k02@2"])
    assert not md.ok and "k02" in md.error and "nope" in md.error
    assert ctx.client.calls == [
        ("put", "abc", "hello world"), ("get", "abc", 3), ("get", "missing", None),
        ("del", "abc", None), ("mput", [("k01", "v01"), ("k02", "v02")]),
        ("mget", [("k01", None), ("k02", 3), ("user@example.com", None)]),
        ("mdel", [("k01", None), ("k02", 2)])]
    assert ctx.written == ["abc", "abc", "k01", "k02", "k01", "k02"]
    assert C.run(ctx, ["timing", "on"]).message == "timing is on" and ctx.timing
    C.run(ctx, ["quit"])
    assert ctx.exited


def test_split_keyver():
    assert C.split_keyver("abc@12") == ("abc", 12)
    assert C.split_keyver("a@b.com") == ("a@b.com", None)
    assert C.split_keyver("abc@") == ("abc@", None)


# ---------------------------------------------------------------------------
# renderers
# ---------------------------------------------------------------------------
def render(fmt, view, interactive=False):
    out, err = io.StringIO(), io.StringIO()
    Renderer(fmt, out=out, err=err, color=False, interactive=interactive, width=100).render(view)
    return out.getvalue(), err.getvalue()


def test_plain_is_one_line_per_result_and_escapes():
    o = V.reads_view([Read("abc", "two\nlines\tand\\", 3, None), Read("nop", "", 0, 2)])
    out, _ = render("plain", o)
    assert out == "abc\t3\ttwo\\nlines\\tand\\\\\nnop@2\t(not found)\n"
    assert esc_plain("a\rb") == "a\\rb"


def test_json_lines():
    out, _ = render("json", V.read_view(Read("abc", "v", 3, 5)))
    assert json.loads(out) == {"op": "get", "key": "abc", "requested": 5, "version": 3,
                               "value": "v", "found": True}
    out, _ = render("json", V.batch_view("mput", [Written("k01", 1), Written("k02", -1, "bad")]))
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[1] == {"op": "mput", "key": "k02", "requested": None, "version": -1,
                       "ok": False, "error": "bad"}


def test_table_get_says_which_version_answered():
    out, _ = render("table", V.read_view(Read("abc", "old", 2, 5)))
    assert "answered by version 2" in out and "asked ≤ 5" in out
    out, _ = render("table", V.read_view(Read("abc", "", 0, 1)))
    assert "(not found)" in out


def test_history_table_has_all_columns():
    from kvs_shell.client import History, VersionInfo
    h = History("abc", [VersionInfo(2, "x" * 500, 1.7e9, "node-1", 9),
                        VersionInfo(1, "short", 1.7e9, "node-2", 3)], 2)
    out, _ = render("table", V.history_view(h))
    for word in ("version", "value", "size", "node", "written", "node-1", "500 B", "…"):
        assert word in out
    assert "x" * 100 not in out  # long values are elided


def test_info_goes_to_stderr_outside_the_interactive_shell():
    out, err = render("plain", V.MessageView(message="timing is on"))
    assert out == "" and err == "timing is on\n"
    out, err = render("table", V.MessageView(message="timing is on"), interactive=True)
    assert "timing is on" in out


def test_a_table_view_needs_no_code_to_print_in_every_format():
    from rich.text import Text
    v = V.TableView(title="t [bold]x", columns=[V.Column("key"), V.Column("n", "right")],
                    rows=[("a[red]b", 1), ("tab\there", Text("2", "green"))], caption="2 rows")
    assert render("plain", v)[0] == "a[red]b\t1\ntab\\there\t2\n"
    assert [json.loads(line) for line in render("json", v)[0].splitlines()] == [
        {"key": "a[red]b", "n": 1}, {"key": "tab\there", "n": "2"}]
    out, _ = render("table", v)
    assert "t [bold]x" in out and "a[red]b" in out and "2 rows" in out  # no markup


def test_a_long_table_says_how_many_rows_it_leaves_out():
    v = V.TableView(columns=[V.Column("key")], rows=[(f"k{i:05d}",) for i in range(1005)],
                    frame="bare", noun="key")
    out, _ = render("table", v)
    assert "k00999" in out and "k01000" not in out
    assert "… 5 more keys not shown (use --format plain or json)" in out
    assert len(render("plain", v)[0].splitlines()) == 1005


def test_a_stream_view_prints_each_item_as_it_comes():
    out, err = io.StringIO(), io.StringIO()
    printed_before = []

    def items(view):
        yield V.MessageView(message="watching from 5")
        for pos in (5, 6):
            printed_before.append(out.getvalue())
            yield V.TableView(columns=[V.Column("pos"), V.Column("key")], rows=[(pos, f"k{pos}")])
        view.error = "watch: compacted"  # the stream ended in failure

    stream = V.StreamView()
    stream.items = items(stream)
    Renderer("plain", out=out, err=err, color=False).render(stream)
    assert out.getvalue() == "5\tk5\n6\tk6\n" and err.getvalue() == "watching from 5\n"
    assert printed_before == ["", "5\tk5\n"] and not stream.ok
    stream = V.StreamView(items=iter([V.TableView(columns=[V.Column("pos")], rows=[(7,)])]))
    assert json.loads(render("json", stream)[0]) == {"pos": 7}


def test_an_error_while_a_stream_runs_fails_the_command(monkeypatch):
    from kvs_shell import app as app_mod

    def changes():
        yield V.TableView(columns=[V.Column("key")], rows=[("k01",)])
        raise client_mod.ServerUnavailable("127.0.0.1:9000 is unreachable")

    monkeypatch.setattr(app_mod.C, "run", lambda ctx, words: V.StreamView(items=changes()))
    shell, out, err = _shell(WhoClient(READER))
    shell.renderer = Renderer("plain", out=out, err=err, color=False)
    try:
        assert not shell.run_words(["watch"]) and shell.failed == 1
        assert out.getvalue() == "k01\n" and "unreachable" in err.getvalue()
    finally:
        shell.close()


def test_elide():
    assert elide("abc") == "abc"
    assert len(elide("y" * 100, 10)) == 10 and elide("y" * 100, 10).endswith("…")


# ---------------------------------------------------------------------------
# completer (fake server listing)
# ---------------------------------------------------------------------------
def test_key_index_is_authoritative_below_a_complete_prefix():
    idx = KeyIndex()
    assert idx.complete("zet") == ([], "missing")
    idx.merge("zet", ["zeta-key"], False)
    assert idx.complete("zeta") == (["zeta-key"], "fresh")  # a longer prefix: no listing
    assert idx.state("ze") == "missing"
    keys = [f"user:{i:05d}" for i in range(200)]
    idx.merge("user:00", reversed(keys), True)  # truncated: only up to user:00199 is known
    assert idx.lookup("user:00") == keys[:100] and idx.lookup("user:00", 300) == keys
    assert idx.state("user:00") == "fresh" and idx.state("user:001") == "missing"
    idx.add(["user:00000a", "user:00001"])
    assert idx.lookup("user:00000") == ["user:00000", "user:00000a"]  # known at once
    assert len(idx.lookup("user:", 1000)) == 201  # no duplicate
    idx.invalidate()  # a write: everything listed is stale (still answered)
    assert idx.complete("zeta") == (["zeta-key"], "stale")
    idx.merge("zet", ["zeta-key", "zeta-two"], False, generation=idx.generation - 1)
    assert idx.state("zet") == "stale"  # asked before the write: still stale
    idx.merge("zet", ["zeta-two"], False)
    assert idx.complete("zet") == (["zeta-two"], "fresh")


def test_key_index_merge_drops_deleted_keys():
    idx = KeyIndex()
    idx.merge("a", ["aa1", "aa2", "ab1"], False)
    idx.merge("b", ["bb1"], False)
    idx.merge("aa", ["aa2"], False)  # aa1 was deleted
    assert idx.lookup("") == ["aa2", "ab1", "bb1"]
    idx.merge("", ["aa2", "ab1"], True)  # truncated: only up to ab1 is known
    assert idx.lookup("") == ["aa2", "ab1", "bb1"]
    idx.merge("\U0010ffff", ["\U0010ffffz"], False)  # no string follows the prefix
    assert idx.lookup("\U0010ffff") == ["\U0010ffffz"]


def test_key_index_clear_drops_listings_asked_before_it():
    idx = KeyIndex()
    idx.merge("abc", ["abc1"], False)
    old = idx.generation
    idx.clear()  # connect: another cluster
    assert idx.complete("abc") == ([], "missing")
    idx.merge("abc", ["abc1"], False, generation=old)  # a listing of the old cluster
    assert idx.complete("abc") == ([], "missing")
    idx.merge("abc", ["abc2"], False, generation=idx.generation)
    assert idx.complete("abc") == (["abc2"], "fresh")


def test_key_refresher_lists_in_the_background_once_per_prefix():
    gate, started = threading.Event(), threading.Event()
    fetched, listed = [], []

    def fetch(prefix, limit, timeout):
        fetched.append((prefix, limit))
        started.set()
        assert gate.wait(10)
        return KeyList([f"{prefix}1", f"{prefix}2"], False)

    ref = KeyRefresher(fetch, lambda *a: listed.append(a), limit=50)
    try:
        ref.refresh_async("aaa", 1)
        assert started.wait(10)  # "aaa" is being listed...
        ref.refresh_async("aaa", 2)  # ...so asking again lists it again afterwards
        ref.refresh_async("bbb", 2)
        ref.refresh_async("bbb", 3)  # still queued: one listing, at the newer generation
        assert not ref.wait_idle(0)
        gate.set()
        assert ref.wait_idle(10)
        assert fetched == [("aaa", 50), ("aaa", 50), ("bbb", 50)] and ref.fetches == 3
        assert listed == [("aaa", ["aaa1", "aaa2"], False, 1),
                          ("aaa", ["aaa1", "aaa2"], False, 2),
                          ("bbb", ["bbb1", "bbb2"], False, 3)]
    finally:
        gate.set()
        ref.close()


def test_key_refresher_relists_recent_prefixes_and_survives_errors():
    listed = []

    def fetch(prefix, limit, timeout):
        if prefix == "bad":
            raise client_mod.ServerUnavailable("down")
        return KeyList([], False)

    ref = KeyRefresher(fetch, lambda prefix, *a: listed.append(prefix))
    assert not ref.refresh("bad", 0) and listed == [] and ref.fetches == 0
    for prefix in ("p1", "p2", "p3", "p1", "p4", "p5"):
        ref.used(prefix)
    ref.refresh_recent(1)
    assert ref.wait_idle(10)
    assert listed == ["p5", "p4", "p1", "p3"]  # the newest first, at most RECENT
    ref.close()
    ref.refresh_async("p9", 2)
    assert ref.wait_idle(10) and "p9" not in listed


class ListingClient:
    """list_keys over a fixed key set, as the server pages it."""

    def __init__(self, keys):
        self.keys, self.calls = keys, []

    def list_keys(self, prefix, limit, timeout):
        self.calls.append(prefix)
        match = [k for k in self.keys if k.startswith(prefix)]
        return KeyList(match[:limit], len(match) > limit)


def test_completer_lists_a_prefix_once_and_relists_recent_ones_after_a_write():
    keys = sorted(f"user:{i:05d}" for i in range(1000)) + ["zeta-key"]
    client = ListingClient(keys)
    comp = KVSCompleter(lambda: client, limit=200)
    try:
        assert comp.complete_keys("zet") == ["zeta-key"]
        assert comp.complete_keys("zeta") == ["zeta-key"] and client.calls == ["zet"]
        assert comp.complete_keys("user:00") == keys[:100]  # truncated listing: 100 shown
        comp.complete_keys("user:00")
        assert client.calls == ["zet", "user:00"]
        client.keys = sorted(keys + ["user:00000a"])  # the server has it (the put is done)
        comp.wrote(["user:00000a"], added=["user:00000a"])
        # known at once (the background listing that follows may or may not have run yet)
        assert "user:00000a" in comp.index.lookup("user:00000")
        # a write makes entries stale: answered at once, re-listed in the background
        assert comp.refresher.wait_idle(10)
        assert client.calls == ["zet", "user:00", "user:00", "zeta", "zet"]
        comp.complete_keys("user:00")
        assert len(client.calls) == 5
    finally:
        comp.close()


def test_completion_of_100k_cached_keys_is_fast():
    keys = [f"k{i:06d}" for i in range(100_000)]
    comp = KVSCompleter(lambda: None)
    comp.index.merge("", keys, False)
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    worst = 0.0
    for prefix in ("k0", "k01", "k0999", "k05000", "k099999", "k1"):
        t0 = time.perf_counter()
        got = list(comp.get_completions(Document(f"get {prefix}"), CompleteEvent()))
        worst = max(worst, time.perf_counter() - t0)
        assert all(c.text.startswith(prefix) for c in got)
    assert worst < 0.05, f"slowest completion {worst * 1000:.1f} ms"


def test_completer_commands_and_fixed_words():
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    comp = KVSCompleter(lambda: SimpleNamespace(addresses=["127.0.0.1:9000", "127.0.0.1:9001"]))

    def texts(line):
        return [c.text for c in comp.get_completions(Document(line), CompleteEvent())]

    assert texts("ins") == ["insere", "insere-v"]
    assert "history" in texts("h") and "help" in texts("h")
    assert texts("timing o") == ["on", "off"]
    assert texts("help sn") == ["snapshot"]
    assert texts("put k1 v1; ge") == ["get"]
    assert texts("connect ") == ["127.0.0.1:9000,127.0.0.1:9001", "127.0.0.1:9000", "127.0.0.1:9001"]
    assert texts("get abc # comment ") == []


def test_lexer_marks_commands_and_bad_args():
    frags = highlight("put ab value; nope x # c")
    styles = {text: style for style, text in frags}
    assert styles["put"] == "class:kvs.command"
    assert "kvs.bad" in styles["ab"]
    assert styles["value"] == "class:kvs.value"
    assert styles["nope"] == "class:kvs.unknown"
    assert styles["# c"] == "class:kvs.comment"
    assert "".join(t for _, t in frags) == "put ab value; nope x # c"


# ---------------------------------------------------------------------------
# addresses and client.sh flags
# ---------------------------------------------------------------------------
def test_parse_servers():
    assert parse_servers("9000") == ["127.0.0.1:9000"]
    assert parse_servers("9000,9001, 9002") == ["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"]
    assert parse_servers("localhost:9000,10.0.0.1:9001") == ["localhost:9000", "10.0.0.1:9001"]
    assert parse_servers(9000, "10.1.1.1") == ["10.1.1.1:9000"]
    for bad in ("", "abc", "host:port", "70000"):
        with pytest.raises(BadTarget):
            parse_servers(bad)


def test_client_builds_a_round_robin_target_without_connecting():
    c = Client(["127.0.0.1:9000", "localhost:9001"])
    try:
        assert c.target == "ipv4:127.0.0.1:9000,127.0.0.1:9001"
        assert c.state in ("idle", "connecting")
    finally:
        c.close()


class _LaggingServers:
    """Fake KVS stub: Insere/Remove answer version 1, Consulta the value; every answer's
    trailers are the next of ``positions`` (what each answering server had applied)."""

    def __init__(self, positions=()):
        self.positions = list(positions)
        self.metadata: list = []  # of every call, in order
        outer = self

        class _Call:
            def __init__(self, trailers):
                self.trailers = trailers

            def peer(self):
                return "ipv4:127.0.0.1:9000"

            def trailing_metadata(self):
                return self.trailers

        class _Method:
            def __init__(self, fn):
                self.fn = fn

            def with_call(self, request, timeout=None, metadata=None):
                outer.metadata.append(metadata)
                pos = outer.positions.pop(0) if outer.positions else None
                return self.fn(request), _Call(() if pos is None else (("kvs-position", pos),))

        self.Insere = _Method(lambda r: SimpleNamespace(versao=1))
        self.Remove = _Method(lambda r: SimpleNamespace(versao=1))
        self.Consulta = _Method(lambda r: SimpleNamespace(chave=r.chave, valor="v1", versao=1))


def test_round_robin_reads_wait_for_the_greatest_position_the_client_has_seen():
    c = Client(["127.0.0.1:9000", "127.0.0.1:9001"])
    try:
        c._kvs = fake = _LaggingServers(["c1/7", "c1/5", "c1/9", None, "c2/3", "garbage", "c2/4"])
        c.get("k1")                  # nothing seen yet: a plain local read
        c.put("k1", "v1")            # answered at position 5 (below what was seen)
        c.get("k1")                  # must wait for 7; the answer says 9
        c.get("k1")                  # an answer without a position changes nothing
        c.get("k1")                  # a re-created cluster: its own positions from now on
        c.get("k1")                  # a malformed position is ignored
        c.delete("k1", 1)
        reads = [md for md in fake.metadata if md is None or "kvs-request-id" not in dict(md)]
        assert reads == [None, (("kvs-after", "c1/7"),), (("kvs-after", "c1/9"),),
                         (("kvs-after", "c1/9"),), (("kvs-after", "c2/3"),)]
        c.consistency = "linearizable"
        c.get("k1")
        assert fake.metadata[-1] == (("kvs-consistency", "linearizable"), ("kvs-after", "c2/4"))
    finally:
        c.close()


def test_single_server_client_sends_no_position():
    c = Client(["127.0.0.1:9000"])
    try:
        c._kvs = fake = _LaggingServers(["c1/7"])
        c.put("k1", "v1")
        c.get("k1")
        assert fake.metadata[-1] is None
    finally:
        c.close()


def test_every_write_carries_a_fresh_request_id_and_reads_none():
    c = Client(["127.0.0.1:9000", "127.0.0.1:9001"])
    try:
        c._kvs = fake = _LaggingServers()
        c.put("k1", "v1")
        c.put("k1", "v1")
        c.get("k1")
        c.delete("k1")
        put1, put2, read, delete = fake.metadata
        ids = [dict(md)["kvs-request-id"] for md in (put1, put2, delete)]
        assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        assert read is None
    finally:
        c.close()


def test_round_robin_service_config_retries_only_unavailable():
    config = json.loads(client_mod.SERVICE_CONFIG)
    (method,) = config["methodConfig"]
    assert {n["service"] for n in method["name"]} == {"kvs.KVS", "kvs.KVSExt"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


@pytest.mark.parametrize("argv,keys,values,versions", [
    (["-p", "9000", "-o", "insere-v", "-k", "k01", "k02", "-v", "v01", "v02"],
     ["k01", "k02"], ["v01", "v02"], []),
    (["-p", "9000", "-o", "insere-v", "-k", "k01", "-v", "v01", "-k", "k02", "-v", "v02"],
     ["k01", "k02"], ["v01", "v02"], []),
    (["-o", "consulta-v", "-p", "9000", "-k", "k01", "-k", "k02", "k03", "-e", "1", "-e", "2"],
     ["k01", "k02", "k03"], [], [1, 2]),
    (["--port=9000", "--op=remove", "--key", "k01", "-e", "-1"], ["k01"], [], [-1]),
])
def test_client_sh_flags_both_styles(argv, keys, values, versions):
    opts = parse_flags(argv)
    assert opts["port"] == "9000"
    assert (opts["keys"], opts["values"], opts["versions"]) == (keys, values, versions)


@pytest.mark.parametrize("argv", [[], ["-p", "1"], ["-o", "bogus"], ["stray"],
                                  ["-o", "consulta", "-e", "x"], ["-p", "1", "-p", "2", "-o", "snapshot"]])
def test_client_sh_bad_flags(argv):
    with pytest.raises(FlagError):
        parse_flags(argv)


# ---------------------------------------------------------------------------
# Raft: members, consistency, no quorum (fake client / fake stubs)
# ---------------------------------------------------------------------------
from kvs_shell.client import Member, MemberList, MemberRemoval, NodeStatus  # noqa: E402
from kvs_proto import kvs_pb2  # noqa: E402

MEMBERS = [Member("node-9000", "127.0.0.1:9000", "voter", True, 41, True),
           Member("node-9001", "127.0.0.1:9001", "voter", True, 40),
           Member("node-9002", "127.0.0.1:9002", "learner", False, 0)]


class RaftClient(FakeClient):
    """FakeClient plus membership and a settable read consistency."""

    def __init__(self, remove_ok=True, remove_error="", remove_members=None, write_error=""):
        super().__init__()
        self.consistency = "local"
        self.remove_ok, self.remove_error = remove_ok, remove_error
        self.remove_members = MEMBERS[:2] if remove_members is None else remove_members
        self.write_error = write_error

    def member_list(self, timeout=None):
        self.calls.append(("member_list",))
        return MemberList(list(MEMBERS), "node-9000", "c0ffee")

    def member_remove(self, node):
        self.calls.append(("member_remove", node))
        return MemberRemoval(node, self.remove_ok, self.remove_error,
                             list(self.remove_members) if self.remove_ok else [])

    def put(self, k, v):
        if self.write_error:
            self.calls.append(("put", k, v))
            return Written(k, -1, self.write_error, value=v)
        return super().put(k, v)


def raft_ctx(**kw):
    ctx = Ctx()
    ctx.client = RaftClient(**kw)
    return ctx


@pytest.mark.parametrize("words,message", [
    (["member", "frob"], r"usage: member list \| member remove NODE"),
    (["member", "remove"], "usage: member remove NODE"),
    (["member", "list", "extra"], "usage: member list"),
    (["member", "remove", "a", "b"], r"usage: member \[list \| remove NODE\]"),
    (["consistency", "eventual"], r"usage: consistency \[local\|linearizable\]"),
])
def test_member_and_consistency_usage_errors_make_no_call(words, message):
    ctx = raft_ctx()
    with pytest.raises(C.UsageError, match=message):
        C.run(ctx, words)
    assert ctx.client.calls == [] and ctx.client.consistency == "local"


@pytest.mark.parametrize("words", [["member"], ["member", "list"], ["members"], ["MEMBER", "LIST"]])
def test_member_list_calls_member_list(words):
    ctx = raft_ctx()
    out = C.run(ctx, words)
    assert out.ok and isinstance(out, V.TableView) and out.title == "members"
    assert [r["node_id"] for r in out.records if r["leader"]] == ["node-9000"]
    assert ctx.client.calls == [("member_list",)]
    assert [n for n, _ in ctx.nodes] == ["node-9000", "node-9001", "node-9002"]


def test_member_remove_success_carries_the_new_list():
    ctx = raft_ctx()
    out = C.run(ctx, ["member", "remove", "node-9002"])
    assert out.ok and out.records[0]["op"] == "member remove"
    assert ctx.client.calls == [("member_remove", "node-9002")]
    assert [m["node_id"] for m in out.records[0]["members"]] == ["node-9000", "node-9001"]
    assert [n for n, _ in ctx.nodes] == ["node-9000", "node-9001"]


def test_member_remove_without_a_list_in_the_answer_asks_for_it():
    ctx = raft_ctx(remove_members=[])
    out = C.run(ctx, ["member", "remove", "node-9002"])
    assert out.ok and ctx.client.calls == [("member_remove", "node-9002"), ("member_list",)]
    assert len(out.records[0]["members"]) == 3


def test_member_remove_refusal_is_a_failed_command_with_the_reason():
    ctx = raft_ctx(remove_ok=False, remove_error="node-7 is not a member")
    out = C.run(ctx, ["member", "remove", "node-7"])
    assert not out.ok and ctx.nodes is None
    assert out.error == "member remove node-7: refused by the server: node-7 is not a member"
    ctx = raft_ctx(remove_ok=False, remove_error="no quorum")
    out = C.run(ctx, ["member", "remove", "node-9001"])
    assert not out.ok and "no quorum" in out.error and "majority" in out.error


def test_consistency_command_switches_the_client():
    ctx = raft_ctx()
    assert C.run(ctx, ["consistency"]).message.startswith("consistency is local")
    out = C.run(ctx, ["consistency", "Linearizable"])
    assert ctx.client.consistency == "linearizable" and "quorum" in out.message
    C.run(ctx, ["consistency", "local"])
    assert ctx.client.consistency == "local" and ctx.client.calls == []


def test_a_write_refused_for_no_quorum_reads_clearly():
    ctx = raft_ctx(write_error="no quorum")
    out = C.run(ctx, ["put", "abc", "value"])
    assert not out.ok
    assert out.error.startswith("put abc: refused by the server: no quorum (not acknowledged: ")
    assert "majority" in out.error and "status" in out.error
    ctx = raft_ctx(write_error="key too long")  # other reasons get no Raft hint
    assert C.run(ctx, ["put", "abc", "value"]).error == "put abc: refused by the server: key too long"


class UnservedReads(FakeClient):
    """Reads answered blank with a reason: the server did not serve them."""

    def get(self, k, v=None):
        return Read(k, "", 0, v, "no quorum")

    def mget(self, items):
        return [Read(k, "val", 1, v) if i == 0 else Read(k, "", 0, v, "no quorum")
                for i, (k, v) in enumerate(items)]

    def snapshot(self, version=0):
        return [], "server node-1 is not in step with the cluster (catching-up)"


def test_an_unserved_read_is_a_failure_not_a_miss():
    ctx = Ctx()
    ctx.client = UnservedReads()
    out = C.run(ctx, ["get", "abc"])
    assert not out.ok
    assert out.error.startswith("get abc: the server did not serve the read: no quorum (")
    assert "consistency local" in out.error
    out = C.run(ctx, ["mget", "k01", "k02"])
    assert not out.ok and out.error.startswith("mget k02: ") and "k01" not in out.error
    out = C.run(ctx, ["snapshot"])
    assert not out.ok and "not in step" in out.error and "consistency local" not in out.error
    # a real miss (no reason) stays a normal answer
    ctx.client = RaftClient()
    assert C.run(ctx, ["get", "missing"]).ok


def test_status_outcome_names_nodes_for_completion():
    class StatusClient(FakeClient):
        def cluster_status(self):
            return [NodeStatus("127.0.0.1:9000", True, "node-9000", role="leader",
                               members=MEMBERS[:2]),
                    NodeStatus("127.0.0.1:9005", True, "node-9005", advertised="h:9005"),
                    NodeStatus("127.0.0.1:9009", False, error="refused")]
    ctx = Ctx()
    ctx.client = StatusClient()
    out = C.run(ctx, ["status"])
    assert out.ok and [r["up"] for r in out.records] == [True, True, False]
    names = dict(ctx.nodes)
    assert set(names) == {"node-9000", "node-9001", "node-9005"}
    assert names["node-9005"] == "h:9005"


# -- renderers -----------------------------------------------------------------
def test_member_list_renders_in_every_format():
    o = V.member_list_view(MemberList(MEMBERS, "node-9000", "c0ffee"))
    out, _ = render("table", o)
    for word in ("node", "address", "role", "online", "match", "leader", "★ leader",
                 "127.0.0.1:9002", "learner", "3 members, leader node-9000, cluster c0ffee"):
        assert word in out, word
    lines = out.splitlines()
    assert "★ leader" in next(line for line in lines if "node-9000" in line)
    assert "★" not in next(line for line in lines if "node-9001" in line)
    out, _ = render("plain", o)
    assert out.splitlines() == ["node-9000\t127.0.0.1:9000\tvoter\tonline\t41\tleader",
                                "node-9001\t127.0.0.1:9001\tvoter\tonline\t40\t-",
                                "node-9002\t127.0.0.1:9002\tlearner\toffline\t0\t-"]
    out, _ = render("json", o)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[2] == {"node_id": "node-9002", "address": "127.0.0.1:9002", "role": "learner",
                       "online": False, "match_index": 0, "leader": False}


def test_member_remove_renders_the_new_list_or_nothing_on_refusal():
    ok = V.member_removed_view(MemberRemoval("node-9002", True, "", MEMBERS[:2]))
    out, _ = render("table", ok)
    assert "OK removed node-9002 from the cluster" in out and "node-9001" in out
    assert "127.0.0.1:9002" not in out
    out, _ = render("plain", ok)
    assert [line.split("\t")[0] for line in out.splitlines()] == ["node-9000", "node-9001"]
    out, _ = render("json", ok)
    d = json.loads(out)
    assert d["op"] == "member remove" and d["ok"] and len(d["members"]) == 2
    refused = V.member_removed_view(MemberRemoval("node-7", False, "not a member"),
                                   "member remove node-7: refused by the server: not a member")
    assert render("table", refused) == ("", "") and render("plain", refused)[0] == ""
    assert json.loads(render("json", refused)[0]) == {
        "op": "member remove", "node": "node-7", "ok": False, "error": "not a member"}


def _raft_nodes():
    return [NodeStatus("127.0.0.1:9000", True, "node-9000", True, 41, 0, 0, "node-9000",
                       "in-step", 10, role="leader", term=3, commit_index=41, applied_index=41,
                       members=MEMBERS, cluster_id="c0ffee"),
            NodeStatus("127.0.0.1:9001", True, "node-9001", True, 38, 0, 0, "node-9000",
                       "catching-up", 9, role="follower", term=3, commit_index=41,
                       applied_index=38, members=MEMBERS[:2], cluster_id="c0ffee"),
            NodeStatus("127.0.0.1:9002", False, "node-9002", error="connection refused")]


def test_status_table_shows_raft_fields_and_each_servers_members():
    out, _ = render("table", V.status_view(_raft_nodes()))
    for word in ("role", "term", "commit", "applied", "lag", "state", "leader node-9000",
                 "cluster c0ffee", "catching-up", "node-9002 down: connection refused",
                 "members as each server sees them", "learner, offline"):
        assert word in out, word
    row = next(line for line in out.splitlines() if "follower" in line)
    assert row.split() == ["node-9001", "follower", "3", "41", "38", "3", "catching-up", "9"]
    # node-9001 does not know node-9002: its cell says so
    view = next(line for line in out.splitlines() if "node-9001" in line and "voter" in line)
    assert view.split()[0] == "node-9001" and view.split()[-1] == "—"


def test_status_table_shows_leader_and_broker_columns_only_when_it_matters():
    nodes = _raft_nodes()
    out, _ = render("table", V.status_view(nodes))
    header = next(line for line in out.splitlines() if "node" in line and "role" in line)
    assert "broker" not in header and "leader" not in header
    nodes[1].leader, nodes[1].broker_connected = "", False
    out, _ = render("table", V.status_view(nodes))
    header = next(line for line in out.splitlines() if "node" in line and "role" in line)
    assert header.split()[-2:] == ["leader", "broker"] and "lost" in out


def test_status_plain_and_json_carry_the_raft_fields():
    out, _ = render("plain", V.status_view(_raft_nodes()))
    lines = [line.split("\t") for line in out.splitlines()]
    assert lines[1] == ["127.0.0.1:9001", "up", "node-9001", "catching-up", "38", "3", "9",
                        "follower", "3", "41", "38", "node-9000,node-9001"]
    assert lines[2] == ["127.0.0.1:9002", "down", "node-9002", "connection refused"]
    out, _ = render("json", V.status_view(_raft_nodes()))
    d = json.loads(out.splitlines()[0])
    assert (d["role"], d["term"], d["commit_index"], d["applied_index"], d["lag"],
            d["cluster_id"]) == ("leader", 3, 41, 41, 0, "c0ffee")
    assert d["members"][0]["leader"] is True


def test_status_of_a_server_without_raft_keeps_the_old_meaning_of_lag():
    n = NodeStatus("127.0.0.1:9000", True, "n1", broker_connected=True, applied_seq=5,
                   leader_seq=9, state="in-step")
    assert not n.raft and n.lag == 4
    out, _ = render("table", V.status_view([n]))
    row = next(line for line in out.splitlines() if line.strip().startswith("n1"))
    assert row.split() == ["n1", "-", "-", "-", "5", "4", "in-step", "0"]


def test_unserved_reads_render_as_not_served():
    r = Read("k02", "", 0, None, "no quorum")
    o = V.reads_view([Read("k01", "v", 1, None), r], "mget k02: not served")
    out, _ = render("plain", o)
    assert out.splitlines() == ["k01\t1\tv", "k02\t(not served)"]
    out, _ = render("table", o)
    assert "(not served) no quorum" in out
    assert render("table", V.read_view(r, "get k02: not served"))[0] == ""


# -- completion and highlighting ------------------------------------------------
def _texts(comp, line):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    return [c.text for c in comp.get_completions(Document(line), CompleteEvent())]


def test_completion_of_member_actions_levels_and_node_names():
    client = RaftClient()
    comp = KVSCompleter(lambda: client)
    assert _texts(comp, "member ") == ["list", "remove"]
    assert _texts(comp, "member r") == ["remove"]
    assert _texts(comp, "consistency l") == ["local", "linearizable"]
    assert _texts(comp, "consistency li") == ["linearizable"]
    assert _texts(comp, "member list ") == []
    # nothing seen yet: one MemberList, then the answer is remembered
    assert _texts(comp, "member remove ") == ["node-9000", "node-9001", "node-9002"]
    assert _texts(comp, "member remove node-9001") == ["node-9001"]
    assert client.calls == [("member_list",)]
    # what a later member list / status showed replaces it (a removed node stops completing)
    comp.saw_nodes([("node-9000", ""), ("node 5", "h:9005")])
    assert _texts(comp, "member remove ") == ["'node 5'", "node-9000"]  # sorted, quoted
    comp.reset()  # connect: another cluster
    assert _texts(comp, "member remove node-90") == ["node-9000", "node-9001", "node-9002"]


def test_node_completion_never_raises_without_a_server():
    class Down:
        def member_list(self, timeout=None):
            raise client_mod.ServerUnavailable("down")
    comp = KVSCompleter(lambda: Down())
    assert _texts(comp, "member remove ") == []


def test_lexer_flags_a_word_outside_a_fixed_choice():
    styles = {t: s for s, t in highlight("consistency bogus; member remove node-1; timing on")}
    assert "kvs.bad" in styles["bogus"]
    assert "kvs.bad" not in styles["remove"] and "kvs.bad" not in styles["node-1"]
    assert "kvs.bad" not in styles["on"]


# -- the client: metadata and conversions (fake stubs, no server) ---------------------
class _StubCall(list):
    """What a grpc call looks like after it ended: its replies, peer and trailers."""

    def __init__(self, replies=(), trailers=()):
        super().__init__(replies)
        self._trailers = trailers

    def peer(self):
        return "ipv4:127.0.0.1:9000"

    def trailing_metadata(self):
        return self._trailers

    def cancel(self):
        pass


class RecordingStubs:
    """Fake KVS and KVSExt stubs: every call's method and metadata, in order."""
    UNARY = {
        "Insere": lambda r: kvs_pb2.Versao(versao=1),
        "Remove": lambda r: kvs_pb2.Versao(versao=1),
        "Consulta": lambda r: kvs_pb2.Tupla(chave=r.chave, valor="v", versao=1),
        "MemberList": lambda r: kvs_pb2.MemberListReply(
            members=[kvs_pb2.Member(node_id="n1", address="h:1", role="voter", online=True,
                                    match_index=7, leader=True),
                     kvs_pb2.Member(node_id="n2", address="h:2", role="learner")],
            leader="n1", cluster_id="c1"),
        "MemberRemove": lambda r: (
            kvs_pb2.MemberRemoveReply(ok=True, members=[kvs_pb2.Member(node_id="n1")])
            if r.node_id == "n2" else kvs_pb2.MemberRemoveReply(ok=False, error="unknown node")),
        "Status": lambda r: kvs_pb2.NodeStatus(
            node_id="n1", state="in-step", role="leader", term=4, commit_index=12,
            applied_index=10, cluster_id="c1", members=[kvs_pb2.Member(node_id="n1")]),
        "History": lambda r: kvs_pb2.KeyHistory(chave=r.chave, max_version=1, versions=[
            kvs_pb2.VersionInfo(versao=1, valor="v")]),
    }
    STREAM = {
        "InsereVarias": lambda rs: [kvs_pb2.Versao(versao=1) for _ in rs],
        "RemoveVarias": lambda rs: [kvs_pb2.Versao(versao=1) for _ in rs],
        "ConsultaVarias": lambda rs: [kvs_pb2.Tupla(chave=r.chave, valor="v", versao=1)
                                      for r in rs],
        "Snapshot": lambda r: [kvs_pb2.Tupla(chave="k01", valor="v", versao=1)],
        "Export": lambda r: [kvs_pb2.ExportChunk(position=3)],
    }

    def __init__(self, trailers=()):
        self.calls: list[tuple[str, object]] = []
        self.trailers = trailers  # of every answer

    def __getattr__(self, name):
        outer = self
        if name in self.UNARY:
            class Unary:
                def with_call(self, request, timeout=None, metadata=None):
                    outer.calls.append((name, metadata, request))
                    return outer.UNARY[name](request), _StubCall(trailers=outer.trailers)
            return Unary()
        if name in self.STREAM:
            def call(request, timeout=None, metadata=None):
                req = request if name in ("Snapshot", "Export") else list(request)
                outer.calls.append((name, metadata, req))
                return _StubCall(outer.STREAM[name](req), outer.trailers)
            return call
        raise AttributeError(name)


def _fake_client(addresses=("127.0.0.1:9000",), trailers=(), **kw):
    c = Client(list(addresses), **kw)
    c._kvs = c._ext = stubs = RecordingStubs(trailers)
    return c, stubs


def _every_kvs_call(c):
    c.put("k01", "v01")
    c.get("k01")
    c.delete("k01")
    c.mput([("k01", "v01")])
    c.mget([("k01", None)])
    c.mdel([("k01", None)])
    c.snapshot()


LINEARIZABLE_MD = (("kvs-consistency", "linearizable"),)


def test_linearizable_reads_carry_the_consistency_metadata_and_nothing_else_does():
    c, stubs = _fake_client(consistency="linearizable")
    try:
        _every_kvs_call(c)
        by_method = {name: md for name, md, _ in stubs.calls}
        assert set(by_method) == {"Insere", "Consulta", "Remove", "InsereVarias",
                                  "ConsultaVarias", "RemoveVarias", "Snapshot"}
        for read in ("Consulta", "ConsultaVarias", "Snapshot"):
            assert tuple(by_method[read]) == LINEARIZABLE_MD, read
        for write in ("Insere", "Remove", "InsereVarias", "RemoveVarias"):
            assert [k for k, _ in by_method[write]] == ["kvs-request-id"], write
    finally:
        c.close()


def test_local_reads_send_no_metadata_and_the_mode_switches_at_runtime():
    c, stubs = _fake_client()
    try:
        assert c.consistency == "local"
        _every_kvs_call(c)
        assert all(md is None for name, md, _ in stubs.calls
                   if name in ("Consulta", "ConsultaVarias", "Snapshot"))
        stubs.calls.clear()
        c.consistency = "linearizable"
        c.get("k01")
        c.consistency = "local"
        c.get("k01")
        assert [md for _, md, _ in stubs.calls] == [LINEARIZABLE_MD, None]
        with pytest.raises(ValueError, match="unknown consistency"):
            c.consistency = "eventual"
        assert c.consistency == "local"
    finally:
        c.close()


def test_every_read_of_a_round_robin_client_waits_for_the_position_it_has_seen():
    c, stubs = _fake_client(("127.0.0.1:9000", "127.0.0.1:9001"),
                            trailers=(("kvs-node", "n1"), ("kvs-position", "c1/42")))
    try:
        _every_kvs_call(c)
        c.history("k01")
        list(c.export("k"))
        assert stubs.calls[0][0] == "Insere"  # the first answer gives the position
        by_method = {name: md for name, md, _ in stubs.calls}
        for read in ("Consulta", "ConsultaVarias", "Snapshot", "History", "Export"):
            assert tuple(by_method[read]) == (("kvs-after", "c1/42"),), read
        for write in ("Insere", "Remove", "InsereVarias", "RemoveVarias"):
            assert [k for k, _ in by_method[write]] == ["kvs-request-id"], write
    finally:
        c.close()
    c, stubs = _fake_client(("127.0.0.1:9000", "127.0.0.1:9001"),
                            trailers=(("kvs-position", "c1/43"),))
    try:  # an export's position counts too, once the stream ended
        assert [k.key for _pos, k in c.export("k")] == []
        c.get("k01")
        assert stubs.calls[-1][1] == (("kvs-after", "c1/43"),)
    finally:
        c.close()


def test_client_member_calls_return_plain_dataclasses():
    c, stubs = _fake_client()
    try:
        ml = c.member_list()
        assert ml.leader == "n1" and ml.cluster_id == "c1" and ml.ids == ["n1", "n2"]
        assert ml.members[0] == Member("n1", "h:1", "voter", True, 7, True)
        assert ml.members[1] == Member("n2", "h:2", "learner", False, 0, False)
        r = c.member_remove("n2")
        assert r.ok and r.node_id == "n2" and [m.node_id for m in r.members] == ["n1"]
        r = c.member_remove("n9")
        assert not r.ok and r.error == "unknown node" and r.members == []
        removes = [(md, req) for name, md, req in stubs.calls if name == "MemberRemove"]
        assert [req.node_id for _, req in removes] == ["n2", "n9"]
        ids = [dict(md)["kvs-request-id"] for md, _ in removes]  # a retry can be recognised
        assert len(set(ids)) == 2
    finally:
        c.close()


def test_client_status_returns_the_raft_fields():
    c, _ = _fake_client()
    try:
        st = c.status()
        assert st.up and st.address == "127.0.0.1:9000"  # the peer that answered
        assert (st.role, st.term, st.commit_index, st.applied_index, st.cluster_id) == (
            "leader", 4, 12, 10, "c1")
        assert st.raft and st.lag == 2 and [m.node_id for m in st.members] == ["n1"]
    finally:
        c.close()


def test_no_quorum_from_a_grpc_status_is_not_called_unreachable():
    import grpc

    class Failed:
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "no quorum: 1 of 3 voters reachable"

        def trailing_metadata(self):
            return ()

    err = client_mod._translate(Failed(), "127.0.0.1:9000")
    assert isinstance(err, client_mod.NoQuorum) and "unreachable" not in str(err)
    assert Written("abc", -1, "No quorum").no_quorum and not Written("abc", -1, "x").no_quorum


def test_the_shell_keeps_consistency_across_connect_and_shows_it():
    import socket

    from kvs_shell.app import Shell
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shell = Shell([f"127.0.0.1:{port}"], timeout=0.3, out=io.StringIO(), err=io.StringIO(),
                  color=False, consistency="linearizable")
    try:
        text = "".join(t for _, t in shell.toolbar())
        assert "reads linearizable" in text
        assert shell.run_words(["connect", str(port)])
        assert shell.client.consistency == "linearizable"
        assert shell.run_words(["consistency", "local"])
        assert "reads local" in "".join(t for _, t in shell.toolbar())
        # a member list feeds node completion
        shell.client = RaftClient()
        assert shell.run_words(["member", "list"])
        assert _texts(shell.completer, "member remove node-900") == [
            "node-9000", "node-9001", "node-9002"]
        assert shell.client.calls == [("member_list",)]
    finally:
        shell.completer.close()


def test_consistency_flag_reaches_the_client(capsys):
    from kvs_shell.__main__ import build_parser, main
    assert build_parser().parse_args([]).consistency == "local"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--consistency", "eventual"])
    assert main(["-p", "1", "--consistency", "linearizable", "-c", "consistency"]) == 0
    assert "consistency is linearizable" in capsys.readouterr().err


def test_kvs_cluster_status_line_shows_raft_fields():
    from kvs_cluster.__main__ import status_text
    line = status_text(kvs_pb2.NodeStatus(node_id="n1", role="follower", term=2, commit_index=9,
                                          applied_index=8, state="catching-up", leader="n0"))
    assert "role=follower term=2 commit=9 applied=8 state=catching-up leader=n0" in line
    assert "applied_seq=4" in status_text(kvs_pb2.NodeStatus(node_id="n1", applied_seq=4))


# ---------------------------------------------------------------------------
# security state: whoami, denials, banner/toolbar, history file
# ---------------------------------------------------------------------------
from kvs_shell.client import Identity, Security  # noqa: E402

ADMIN = Identity("admin", ["admin"], "token", True, [], [], True, "127.0.0.1:9000")
READER = Identity("reader", ["read-only"], "token", False, [""], [], False, "127.0.0.1:9000")


class WhoClient:
    """A fake client for the identity pieces: answers whoami with ``ident``."""

    def __init__(self, ident, security=Security(tls_ca=b"ca", token="t" * 20)):
        self.ident = ident
        self.security = security
        self.state = "connected"
        self.label = "127.0.0.1:9000"
        self.last_peer = ""
        self.consistency = "local"

    def whoami(self, timeout=None):
        if isinstance(self.ident, Exception):
            raise self.ident
        return self.ident

    def close(self):
        pass


def _shell(client):
    from kvs_shell.app import Shell
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(["127.0.0.1:1"], timeout=0.3, out=out, err=err, color=False, width=200)
    shell.client.close()
    shell.client = client
    return shell, out, err


@pytest.mark.parametrize("fmt", ["plain", "json", "table"])
def test_whoami_shows_identity_roles_prefixes_and_tls(fmt):
    shell, out, _ = _shell(WhoClient(READER, Security()))
    shell.renderer = Renderer(fmt, out=out, err=io.StringIO(), color=False, width=200)
    try:
        assert shell.run_words(["whoami"])
        text = out.getvalue()
        if fmt == "plain":
            rows = dict(line.split("\t", 1) for line in text.splitlines())
            assert rows["name"] == "reader" and rows["roles"] == "read-only"
            assert rows["read"] == "every key" and rows["write"] == "none"
            assert rows["tls"] == "no" and rows["connection"] == "plaintext, no credentials"
        elif fmt == "json":
            doc = json.loads(text)
            assert doc["name"] == "reader" and doc["read_prefixes"] == [""] and doc["tls"] is False
        else:
            assert "reader" in text and "plaintext, no credentials" in text
        assert shell.identity is READER   # the toolbar shows it from now on
    finally:
        shell.close()


def test_prefixes_text():
    from kvs_shell.views import prefixes_text
    assert prefixes_text([], True) == "every key (admin)"
    assert prefixes_text(["app/", "x"], False) == "'app/', 'x'"
    assert prefixes_text([], False) == "none"


def test_toolbar_and_banner_show_tls_or_plaintext_and_the_identity():
    shell, out, _ = _shell(WhoClient(ADMIN))
    try:
        bar = "".join(t for _, t in shell.toolbar())
        assert "TLS" in bar and "identity not checked" in bar
        shell.banner()   # asks the server who we are
        assert "connection: TLS, token · admin [admin] via token" in out.getvalue()
        assert "TLS admin [admin] via token" in "".join(t for _, t in shell.toolbar())
    finally:
        shell.close()
    shell, out, _ = _shell(WhoClient(client_mod.Unsupported("no WhoAmI"), Security()))
    try:
        shell.banner()
        assert "connection: plaintext, no credentials" in out.getvalue()
        assert "identity unknown: no WhoAmI" in out.getvalue()
        styles = dict((t.strip(), c) for c, t in shell.toolbar())
        assert styles["plaintext"] == "class:bottom-toolbar.warn"
        assert "(no credentials)" in "".join(t for _, t in shell.toolbar())
    finally:
        shell.close()


def test_each_denial_gets_its_own_clear_message():
    import grpc
    err = client_mod._translate(FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "unknown token"), "x")
    assert isinstance(err, client_mod.Unauthenticated)
    assert str(err).startswith("not authenticated: unknown token")
    err = client_mod._translate(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED,
                                        "reader (roles read-only) may not write key 'abc'"), "x")
    assert isinstance(err, client_mod.PermissionDenied)
    assert str(err).startswith("permission denied: reader (roles read-only) may not write key 'abc'")


def test_security_describe():
    assert Security().describe() == "plaintext, no credentials"
    assert Security(token="t").describe() == "plaintext, token"
    assert Security(tls_ca=b"c", tls_cert=b"c", tls_key=b"k").describe() == "TLS, client certificate"


def test_token_files_others_can_read_are_refused(tmp_path):
    f = tmp_path / "token"
    f.write_text("a-long-enough-token-value\n")
    f.chmod(0o644)
    with pytest.raises(client_mod.SecurityConfigError, match="chmod 600"):
        client_mod.security_from(token_file=str(f), environ={})
    f.chmod(0o600)
    assert client_mod.security_from(token_file=str(f), environ={}).token == "a-long-enough-token-value"


def test_history_file_is_created_0600_and_tightened(tmp_path, monkeypatch):
    import os
    import stat

    from kvs_shell.app import private_history
    new = private_history(tmp_path / "sub" / "hist")
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o600
    old = tmp_path / "old-hist"
    old.write_text("+put secret value\n")
    old.chmod(0o644)
    private_history(old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    assert old.read_text() == "+put secret value\n"   # kept, only the mode changes


def test_kvs_common_channel_pieces():
    from kvs_common.channel import bearer, make_channel
    assert bearer("tok") == (("authorization", "Bearer tok"),)
    assert bearer(None) == ()
    with pytest.raises(ValueError):
        make_channel("127.0.0.1:1", cert=b"c", key=b"k")   # a certificate needs a CA
    make_channel("127.0.0.1:1").close()


@pytest.mark.parametrize("value,insecure", [("1", True), ("0", False), ("false", False),
                                            ("no", False), ("", False), (None, False),
                                            ("yes", False), (" 1", False)])
def test_kvs_insecure_means_insecure_only_when_exactly_1(value, insecure):
    from kvs_cluster.__main__ import insecure_requested
    env = {} if value is None else {"KVS_INSECURE": value}
    assert insecure_requested(env) is insecure


# ---------------------------------------------------------------------------
# time travel: TIME forms, paging, --at, diff (a fake History service, no server)
# ---------------------------------------------------------------------------
from kvs_shell import timetravel as TT  # noqa: E402
from kvs_shell.client import History, VersionInfo  # noqa: E402


class _FakeHistory:
    """KVSExt.History as the server pages it: newest first, < before_version, limit,
    ``more`` when older live versions remain.  ``removed`` versions are not live."""

    def __init__(self, n: int, value=lambda i: f"value-{i}", removed=(), t0: float = 1000.0):
        self.versions = [VersionInfo(i, value(i), t0 + i, "node-1", i)
                         for i in range(1, n + 1) if i not in removed]
        self.top = n
        self.calls: list[tuple[int, int]] = []

    def history(self, key, limit=0, before_version=0):
        self.calls.append((limit, before_version))
        older = [v for v in reversed(self.versions)
                 if not before_version or v.version < before_version]
        page = older[:limit or 1000]
        return History(key, page, self.top, "", len(older) > len(page))


def _run(client, line):
    return C.run(SimpleNamespace(client=client, timing=False), split_commands(line)[0])


@pytest.mark.parametrize("text,expected", [
    ("now", 10_000.0), ("30s ago", 9_970.0), ("5m ago", 9_700.0), ("2h ago", 2_800.0),
    ("1d ago", 10_000.0 - 86_400), ("1.5h ago", 4_600.0), ("2 min ago", 9_880.0),
    ("1970-01-01T02:46:40Z", 10_000.0), ("1970-01-01T03:46:40+01:00", 10_000.0),
    ("1970-01-01 02:46:40.5+00:00", 10_000.5),
])
def test_parse_time_forms(text, expected):
    assert TT.parse_time(text, now=10_000.0) == pytest.approx(expected)


def test_parse_time_naive_iso_is_local_time():
    import datetime as dt
    assert TT.parse_time("2026-12-01T10:00:00") == dt.datetime(2026, 12, 1, 10).timestamp()


@pytest.mark.parametrize("bad", ["yesterday", "5 ago", "5x ago", "ago", "", "2026-13-01"])
def test_parse_time_rejects_other_forms(bad):
    with pytest.raises(TT.TimeError, match="ISO 8601"):
        TT.parse_time(bad, now=0)


def test_options_split_and_usage_errors():
    hist, get = C.lookup("history"), C.lookup("get")
    assert C.split_options(hist, ["abc", "--limit", "5", "--since=2h ago"]) == (
        ["abc"], {"--limit": "5", "--since": "2h ago"})
    assert C.split_options(get, ["abc", "--at", "5m", "ago"]) == (["abc"], {"--at": "5m ago"})
    assert C.split_options(get, ["--", "--abc"]) == (["--abc"], {})
    with pytest.raises(C.UsageError, match="unknown option '--nope'"):
        C.split_options(hist, ["abc", "--nope", "1"])
    with pytest.raises(C.UsageError, match="needs a value"):
        C.split_options(hist, ["abc", "--limit"])
    # options do not count as arguments; other commands take "--x" as a plain word
    assert C.split_options(C.lookup("put"), ["abc", "--x"]) == (["abc", "--x"], {})
    fake = _FakeHistory(3)
    for line, err in (("history abc --limit 0", "at least 1"),
                      ("history abc --limit x", "whole number"),
                      ("history abc --since soon", "ISO 8601"),
                      ("get abc 2 --at now", "either VERSION or --at"),
                      ("history abc def", "usage: history")):
        with pytest.raises(C.UsageError, match=err):
            _run(fake, line)


def test_history_pages_until_the_limit():
    fake = _FakeHistory(30)
    h = TT.collect_history(fake, "key", limit=25, page=10)
    assert [v.version for v in h.versions] == list(range(30, 5, -1))
    assert h.more is True and h.max_version == 30
    assert fake.calls == [(10, 0), (10, 21), (5, 11)]  # asks only for what is missing
    fake.calls.clear()
    h = TT.collect_history(fake, "key", page=7)  # no limit: to the oldest
    assert [v.version for v in h.versions] == list(range(30, 0, -1)) and h.more is False
    assert [b for _, b in fake.calls] == [0, 24, 17, 10, 3]


def test_history_since_stops_at_the_first_older_version():
    fake = _FakeHistory(30, removed={20, 21})
    h = TT.collect_history(fake, "key", since=1000 + 15, page=4)
    assert [v.version for v in h.versions] == [30, 29, 28, 27, 26, 25, 24, 23, 22, 19, 18, 17,
                                              16, 15]
    assert h.more is True
    assert all(b == 0 or b > 14 for _, b in fake.calls)  # stopped paging there
    out, _ = render("plain", _run(fake, "history key --limit 2"))
    assert [l.split("\t")[:2] for l in out.splitlines()] == [["30", "value-30"], ["29", "value-29"]]
    doc = json.loads(render("json", _run(fake, "history key --limit 2"))[0])
    assert doc["more"] is True and [v["version"] for v in doc["versions"]] == [30, 29]
    out, _ = render("table", _run(fake, "history key --limit 2"))
    assert "2 live versions shown (older ones remain)" in out


def test_get_at_picks_the_greatest_version_written_by_then():
    fake = _FakeHistory(30, removed={10})
    assert TT.select_at(fake.versions, 1000 + 7.5).version == 7
    assert TT.select_at(fake.versions, 999) is None
    # clocks need not be monotonic: the greatest *version* written by then wins
    skewed = [VersionInfo(3, "c", 50.0, "n", 3), VersionInfo(2, "b", 80.0, "n", 2),
              VersionInfo(1, "a", 10.0, "n", 1)]
    assert TT.select_at(skewed, 60.0).version == 3
    v, top = TT.version_at(fake, "key", 1000 + 10.5, page=6)  # 10 removed: 9 was live
    assert (v.version, top) == (9, 30)
    assert [b for _, b in fake.calls] == [0, 25, 19, 13]
    assert TT.version_at(fake, "key", 0)[0] is None
    o = _run(fake, "get key --at 1970-01-01T00:16:50Z")  # 1010 s: version 10 removed
    assert render("plain", o)[0] == "key\t9\tvalue-9\n"
    doc = json.loads(render("json", o)[0])
    assert doc["version"] == 9 and doc["found"] and doc["at"].startswith("1970-01-01T00:16:50")
    o = _run(fake, "get key --at 1970-01-01T00:00:00Z")
    assert o.ok and render("plain", o)[0] == "key\t(not found)\n"
    assert "(not found)" in render("table", o)[0]


def test_diff_of_plain_values_and_of_json_values():
    fake = _FakeHistory(3, value=lambda i: f"line one\nline {i}\nline three")
    out, _ = render("plain", _run(fake, "diff key 1 3"))
    assert out.splitlines() == ["--- key@1", "+++ key@3", "@@ -1,3 +1,3 @@", " line one",
                                "-line 1", "+line 3", " line three"]
    out, _ = render("plain", _run(fake, "diff key 2"))  # V2: the latest
    assert "-line 2" in out and "+line 3" in out
    assert fake.calls[-2:] == [(1, 3), (1, 0)]  # one version per call
    docs = [{"name": "ada", "roles": ["a"], "n": 1}, {"roles": ["a", "b"], "name": "ada", "n": 1}]
    fake = _FakeHistory(2, value=lambda i: json.dumps(docs[i - 1]))
    d = _run(fake, "diff key 1 2").records[0]
    assert d["json"] and [l for l in d["lines"] if l[:1] in "+-" and l[:3] not in ("+++", "---")] \
        == ['-    "a"', '+    "a",', '+    "b"']
    doc = json.loads(render("json", _run(fake, "diff key 1 2"))[0])
    assert (doc["from"], doc["to"], doc["identical"], doc["json"]) == (1, 2, False, True)
    table, _ = render("table", _run(fake, "diff key 1 2"))
    assert "--- key@1" in table and '+    "b"' in table
    colored = io.StringIO()
    Renderer("table", out=colored, err=io.StringIO(), color=True, width=100).render(
        _run(fake, "diff key 1 2"))
    assert "\x1b[" in colored.getvalue()  # rich colours the + / - lines
    same = _FakeHistory(2, value=lambda i: "same")
    o = _run(same, "diff key 1 2")
    assert o.records[0]["identical"] and render("plain", o)[0] == ""
    assert "have the same value" in render("table", o)[0]


def test_diff_of_a_missing_version_is_a_clear_error():
    fake = _FakeHistory(5, removed={2})
    o = _run(fake, "diff key 2 4")
    assert not o.ok and o.error == ("diff key: version 2: not live (removed, or never written; "
                                    "highest ever 5)")
    o = _run(fake, "diff key 1 9")
    assert not o.ok and "version 9" in o.error
    o = _run(_FakeHistory(0), "diff key 1")
    assert not o.ok and "the key was never written" in o.error
    out, _ = render("plain", o)
    assert out == ""  # the error goes to stderr (the shell prints o.error)
    with pytest.raises(C.UsageError, match="usage: diff"):
        _run(fake, "diff key")


def test_completion_of_options_times_and_diff_versions():
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    fake = _FakeHistory(3)
    comp = KVSCompleter(lambda: fake)

    def texts(line):
        return [c.text for c in comp.get_completions(Document(line), CompleteEvent())]

    assert texts("history abc --") == ["--limit", "--since"]
    assert texts("history abc --limit 5 --") == ["--since"]
    assert texts("history abc --limit ") == ["10", "25", "100", "1000"]
    assert texts("history abc --since ") == ["'5m ago'", "'1h ago'", "'1d ago'", "now"]
    assert texts("get abc --a") == ["--at"]
    assert texts("get abc --at 1") == ["'1h ago'", "'1d ago'"]
    assert texts("diff abc ") == ["3", "2", "1"]
    assert texts("diff abc 1 ") == ["3", "2", "1"]
    assert texts("get abc --at now ") == ["3", "2", "1"]  # the VERSION position is still free
    assert texts("del abc ") == ["3", "2", "1"]
    frags = {t: s for s, t in highlight("history abc --limit 5 --since 2h ago; get abc --bad 1")}
    assert frags["--limit"] == "class:kvs.option" and frags["5"] == "class:kvs.version"
    assert frags["2h"] == frags["ago"] == "class:kvs.value"
    assert "kvs.bad" in frags["--bad"]


# ---------------------------------------------------------------------------
# watch, export / import, compact, retention (fake clients, no server)
# ---------------------------------------------------------------------------
from kvs_shell.client import (Change, Compacted, ExportedKey, FailedPrecondition,  # noqa: E402
                              InvalidArgument, RetentionInfo, ServerUnavailable, WatchMessage)


class _Stream:
    """A scripted watch stream: WatchMessages, exceptions to raise; then (block) it waits
    until cancelled, as a live stream does."""

    def __init__(self, server, items, block=False):
        self.server, self.items, self.block = server, list(items), block
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def __iter__(self):
        for item in self.items:
            if self.cancelled.is_set():
                return
            if isinstance(item, BaseException):
                raise item
            yield item
        if self.block:
            assert self.cancelled.wait(10), "nobody cancelled the stream"


class WatchClient(FakeClient):
    label = "127.0.0.1:9000"

    def __init__(self, *streams, info=RetentionInfo(0, 0, 41, 1)):
        super().__init__()
        self.streams = list(streams)
        self.info = info

    def watch(self, prefix, start):
        self.calls.append(("watch", prefix, start))
        return self.streams.pop(0) if self.streams else _Stream("none", [ServerUnavailable("x")])

    def retention(self, keep=None):
        self.calls.append(("retention", keep))
        if isinstance(self.info, Exception):
            raise self.info
        return self.info if keep is None else RetentionInfo(keep, 0, 42, 1, dropped=3)

    def compact(self, position):
        self.calls.append(("compact", position))
        if position > self.info.position:
            raise InvalidArgument(f"position {position} is beyond the last applied position "
                                  f"{self.info.position}")
        if position <= 10:
            raise FailedPrecondition("compacted: already compacted at position 10")
        return RetentionInfo(0, position, self.info.position, position, dropped=5)


def _chg(pos, key="app/one", op="put", ver=1, value="hello", all_versions=False):
    return Change(pos, op, key, ver, value if op == "put" else "", "node-9001",
                  1_700_000_000.0 + pos, all_versions)


def _wctx(client, interactive=False):
    ctx = Ctx()
    ctx.client = client
    ctx.interactive = interactive
    return ctx


def test_watch_pipes_one_json_object_per_change_flushed_as_it_comes():
    stream = _Stream("node-9001", [WatchMessage(4, []),
                                   WatchMessage(6, [_chg(5), _chg(6, "app/two", ver=3)]),
                                   WatchMessage(7, [_chg(7, op="remove", all_versions=True)]),
                                   KeyboardInterrupt()])
    ctx = _wctx(WatchClient(stream))
    view = C.run(ctx, ["watch", "app/"])
    out, err = io.StringIO(), io.StringIO()

    class Flushes(io.StringIO):  # what had been flushed when each line was written
        seen = []

        def flush(self):
            self.seen.append(self.getvalue().count("\n"))

    out = Flushes()
    Renderer("plain", out=out, err=err, color=False).render(view)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert docs[0] == {"position": 5, "op": "put", "key": "app/one", "version": 1,
                       "value": "hello", "node": "node-9001",
                       "written_at": "2023-11-14T22:13:25.000+00:00", "all_versions": False}
    assert [d["position"] for d in docs] == [5, 6, 7]
    assert docs[2]["op"] == "remove" and docs[2]["value"] is None and docs[2]["all_versions"]
    assert {1, 2, 3} <= set(out.seen)  # flushed after every change
    assert "watching keys starting with 'app/' on node-9001 from position 5" in err.getvalue()
    assert "watch stopped after 3 changes; `watch app/ --from 8` goes on" in err.getvalue()
    assert view.ok and ctx.exited  # a signal ends a script: no further command runs
    assert ctx.client.calls == [("watch", "app/", 0)]
    json_out, _ = render("json", C.run(_wctx(WatchClient(_Stream("s", [
        WatchMessage(1, []), WatchMessage(2, [_chg(2)]), KeyboardInterrupt()]))), ["watch"]))
    assert [json.loads(x)["position"] for x in json_out.splitlines()] == [2]


def test_watch_table_rows_and_ctrl_c_back_to_the_prompt():
    stream = _Stream("node-9001", [WatchMessage(4, []), WatchMessage(5, [_chg(5)]),
                                   WatchMessage(6, [_chg(6, op="remove", ver=1)]),
                                   KeyboardInterrupt()])
    ctx = _wctx(WatchClient(stream), interactive=True)
    view = C.run(ctx, ["watch", "app/", "--from", "5"])
    out, _ = render("table", view, interactive=True)
    lines = out.splitlines()
    assert lines[0].startswith("watching keys starting with 'app/' on node-9001 from position 5")
    assert lines[1].split() == ["position", "time", "op", "key", "version", "node", "value"]
    assert lines[2].split()[0] == "5" and "put" in lines[2] and "hello" in lines[2]
    assert lines[3].split()[2:5] == ["del", "app/one", "1"]
    assert lines[2].index("app/one") == lines[3].index("app/one")  # fixed columns
    assert lines[2].index("node-9001") == lines[3].index("node-9001")
    long = V.change_view(_chg(9, value="x" * 200))
    narrow, _ = render("table", long)  # 100 columns: the row is cut, never wrapped
    assert len(narrow.splitlines()) == 1 and narrow.rstrip().endswith("…")
    assert "watch stopped after 2 changes" in lines[4]
    assert view.ok and not ctx.exited  # interactive: back to the prompt
    assert ctx.client.calls == [("watch", "app/", 5)]


def test_watch_moves_to_another_server_without_gap_or_duplicate():
    first = _Stream("node-9001", [WatchMessage(4, []), WatchMessage(6, [_chg(5), _chg(6)]),
                                  ServerUnavailable("server 127.0.0.1:9001 is unreachable")])
    # the new server resends 6 (already shown), then goes on
    second = _Stream("node-9002", [WatchMessage(9, []), WatchMessage(7, [_chg(6), _chg(7)]),
                                   KeyboardInterrupt()])
    ctx = _wctx(WatchClient(first, second))
    out, err = render("json", C.run(ctx, ["watch", "app/"]))
    assert [json.loads(x)["position"] for x in out.splitlines()] == [5, 6, 7]
    assert ctx.client.calls == [("watch", "app/", 0), ("watch", "app/", 7)]
    assert "reconnecting (attempt 1): server 127.0.0.1:9001 is unreachable; resuming at " \
           "position 7" in err
    assert "resumed on node-9002 at position 7" in err


def test_watch_from_a_compacted_position_fails_with_the_oldest_and_a_hint():
    stream = _Stream("s", [Compacted("watch: compacted: oldest available position 40", 40)])
    ctx = _wctx(WatchClient(stream))
    view = C.run(ctx, ["watch", "app/", "--from", "3"])
    out, _ = render("json", view)
    assert out == "" and not view.ok
    assert "position 3 is compacted" in view.error
    assert "the oldest position the servers still have is 40" in view.error
    assert "`export FILE app/`" in view.error and "`watch app/ --from` P+1" in view.error


def test_watch_that_loses_every_server_fails_with_where_to_resume(monkeypatch):
    monkeypatch.setattr(C, "WATCH_RECONNECT_TIMEOUT", 0.0)
    monkeypatch.setattr(C, "WATCH_BACKOFF", 0.0)
    stream = _Stream("s", [WatchMessage(1, []), WatchMessage(2, [_chg(2)]),
                           ServerUnavailable("server down")])
    ctx = _wctx(WatchClient(stream))
    view = C.run(ctx, ["watch", "app/"])
    view.items = list(view.items)  # runs it to the end
    assert not view.ok and "`watch app/ --from 3` resumes without a gap" in view.error


@pytest.mark.parametrize("words,message", [
    (["watch", "app/", "--from", "0"], "invalid --from 0"),
    (["watch", "app/", "--from", "x1"], "invalid --from 'x1'"),
    (["watch", "a", "b"], "usage: watch"),
    (["compact"], "usage: compact POSITION"),
    (["compact", "-4"], "invalid position -4"),
    (["retention", "many"], "invalid retention 'many'"),
    (["export"], "usage: export FILE"),
    (["import", "a", "b"], "usage: import FILE"),
])
def test_new_commands_refuse_bad_input_before_any_call(words, message):
    ctx = _wctx(WatchClient())
    with pytest.raises(C.UsageError, match=message):
        C.run(ctx, words)
    assert ctx.client.calls == []


def test_ctrl_c_while_a_stream_is_printed_ends_it_as_a_success(monkeypatch):
    from kvs_shell import app as app_mod
    closed = []

    def items():
        try:
            yield V.TableView(columns=[V.Column("key")], rows=[("k01",)])
            yield V.TableView(columns=[V.Column("key")], rows=[("k02",)])
        finally:
            closed.append(True)

    class Interrupting(Renderer):  # Ctrl-C lands while the renderer prints
        def render(self, view):
            for item in view.items:
                super().render(item)
                raise KeyboardInterrupt

    monkeypatch.setattr(app_mod.C, "run", lambda ctx, words: V.StreamView(items=items()))
    shell, out, err = _shell(WhoClient(READER))
    shell.renderer = Interrupting("plain", out=out, err=err, color=False)
    try:
        assert shell.run_words(["watch"]) and shell.failed == 0
        assert out.getvalue() == "k01\n" and err.getvalue() == "" and closed == [True]
        assert shell.exit_requested  # not interactive: the script ends
    finally:
        shell.close()


class ExportClient(WatchClient):
    def __init__(self, keys, position=9, fail=None):
        super().__init__()
        self.keys, self.position, self.fail = keys, position, fail
        self.timeout = 5.0
        self.store: dict[str, list[str]] = {}

    def export(self, prefix, consistency=None):
        self.calls.append(("export", prefix))
        client = self

        class Handle:
            position = client.position

            def cancel(self):
                pass

            def __iter__(self):
                for k in client.keys:
                    if client.fail:
                        raise client.fail
                    if k.key.startswith(prefix):
                        yield client.position, k
        return Handle()

    def mput(self, pairs, request_id=None, timeout=None):
        self.calls.append(("mput", len(pairs)))
        out = []
        for k, v in pairs:
            if self.fail:
                out.append(Written(k, -1, "no quorum: test"))
                continue
            self.store.setdefault(k, []).append(v)
            out.append(Written(k, len(self.store[k]), value=v))
        return out

    def mdel(self, items, request_id=None, timeout=None):
        self.calls.append(("mdel", len(items)))
        return [Written(k, v, requested=v) for k, v in items]


def _exported():
    from kvs_shell.client import VersionInfo
    return [ExportedKey("app/a", 2, [VersionInfo(1, "a-one", 1.7e9, "node-1", 3),
                                     VersionInfo(2, "a-two", 1.7e9, "node-1", 5)]),
            ExportedKey("app/b", 3, [VersionInfo(3, "b-three", 1.7e9, "node-2", 8)]),
            ExportedKey("zzz/c", 1, [VersionInfo(1, "c-one", 1.7e9, "node-2", 2)])]


class _ProgressCtx(Ctx):
    def __init__(self, client):
        super().__init__()
        self.client = client
        self.bars = []

    def progress(self, label, unit):
        import contextlib
        calls = []
        self.bars.append((label, unit, calls))
        return contextlib.nullcontext(lambda done, total: calls.append((done, total)))


def test_export_then_import_show_their_summaries(tmp_path):
    path = tmp_path / "out.jsonl"
    ctx = _ProgressCtx(ExportClient(_exported()))
    view = C.run(ctx, ["export", str(path), "app/"])
    assert view.ok and view.records == [{"op": "export", "path": str(path), "prefix": "app/",
                                         "position": 9, "keys": 2, "versions": 3,
                                         "bytes": path.stat().st_size}]
    assert render("plain", view)[0] == f"{path}\t9\t2\t3\t{path.stat().st_size}\n"
    table, _ = render("table", view)
    assert "OK exported 2 keys (3 versions" in table and "as of position 9" in table
    assert ctx.bars[0][:2] == ("exporting 'app/'", "keys") and ctx.bars[0][2] == [(1, None),
                                                                                  (2, None)]
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["position"] == 9 and len(lines) == 4

    target = _ProgressCtx(ExportClient([]))
    view = C.run(target, ["import", str(path)])
    assert view.ok and target.written == ["*"]  # completion caches are due again
    rec = view.records[0]
    assert (rec["keys"], rec["versions"], rec["total"], rec["batches"], rec["placeholders"],
            rec["renumbered"], rec["complete"]) == (2, 3, 3, 1, 2, 0, True)
    assert target.client.store == {"app/a": ["a-one", "a-two"],
                                   "app/b": [V_PLACEHOLDER, V_PLACEHOLDER, "b-three"]}
    assert target.bars[0][2][-1] == (3, 3)
    table, _ = render("table", view)
    for word in ("import complete", "placeholders", "2 (gaps filled, then removed)", "3 of 3"):
        assert word in table
    assert render("plain", view)[0] == f"{path}\t2\t3\t1\t2\t0\t0\n"


V_PLACEHOLDER = "(kvs import: placeholder for a missing version)"


def test_export_and_import_errors_are_clear(tmp_path):
    ctx = _ProgressCtx(ExportClient(_exported()))
    view = C.run(ctx, ["export", str(tmp_path / "no" / "such" / "dir.jsonl")])
    assert not view.ok and "cannot write the file: No such file or directory" in view.error
    ctx.client.fail = client_mod.PermissionDenied("permission denied: reader may not export")
    view = C.run(ctx, ["export", str(tmp_path / "x.jsonl")])
    assert view.error.endswith("permission denied: reader may not export (no file was written)")
    assert not (tmp_path / "x.jsonl").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvs_export": 1, "position": 3}\n{"key": "abc", "version": 1}\n')
    target = ExportClient([])
    view = C.run(_wctx(target), ["import", str(bad)])
    assert view.error == (f"import {bad}: not a valid export file: line 2: 'value' must be "
                          "text of at least 3 characters, not None; nothing was imported")
    assert [c for c in target.calls if c[0] == "mput"] == []
    view = C.run(_wctx(target), ["import", str(tmp_path / "missing.jsonl")])
    assert "cannot read the file: No such file or directory" in view.error

    good = tmp_path / "good.jsonl"
    C.run(_ProgressCtx(ExportClient(_exported())), ["export", str(good)])
    target = ExportClient([], fail=True)
    view = C.run(_wctx(target), ["import", str(good)])
    assert not view.ok and "import stopped at batch 0 (lines 2-5)" in view.error
    assert "nothing was imported" in view.error and "Rerun is safe" in view.error
    assert view.records[0]["complete"] is False and view.records[0]["line"] == 0


def test_compact_and_retention_views_and_refusals():
    ctx = _wctx(WatchClient(info=RetentionInfo(0, 0, 41, 1)))
    view = C.run(ctx, ["retention"])
    assert view.records == [{"op": "retention", "keep_versions": 0, "compacted": 0,
                             "position": 41, "oldest_watch": 1, "dropped": 0}]
    table, _ = render("table", view)
    assert "all (0: no limit)" in table and "never" in table and "41 (last applied)" in table
    assert render("plain", view)[0] == "0\t0\t41\t1\t0\n"
    assert ctx.written == []

    view = C.run(ctx, ["retention", "2"])
    assert view.ok and view.records[0]["keep_versions"] == 2 and ctx.written == ["*"]
    table, _ = render("table", view)
    assert "now keeping at most 2 live versions per key: 3 versions dropped" in table

    view = C.run(ctx, ["compact", "30"])
    assert view.ok and view.records[0] == {"op": "compact", "keep_versions": 0,
                                           "compacted": 30, "position": 41,
                                           "oldest_watch": 30, "dropped": 5}
    table, _ = render("table", view)
    assert "compacted at position 30: 5 versions dropped" in table

    view = C.run(ctx, ["compact", "99"])
    assert view.error == "compact 99: position 99 is beyond the last applied position 41"
    assert json.loads(render("json", view)[0])["ok"] is False
    view = C.run(ctx, ["compact", "7"])
    assert view.error == "compact 7: compacted: already compacted at position 10"
    assert ("compact", 99) in ctx.client.calls


def test_completion_of_positions_counts_and_files(tmp_path):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    client = WatchClient(info=RetentionInfo(2, 5, 41, 6))
    comp = KVSCompleter(lambda: client)

    def got(line):
        return [(c.text, c.display_meta_text) for c in
                comp.get_completions(Document(line), CompleteEvent())]

    assert got("compact ") == [("41", "the current position (last applied)")]
    assert got("compact 5") == []
    assert got("watch app/ --") == [("--from", "replay from this log position (history's seq)")]
    assert [t for t, _ in got("watch app/ --from ")] == ["42", "41", "6"]
    assert [t for t, _ in got("watch app/ --from 4")] == ["42", "41"]
    assert got("retention ")[:2] == [("2", "current"), ("0", "keep every version")]
    assert [c for c in client.calls if c[0] == "retention"] == [("retention", None)]  # cached
    comp.wrote(None)  # a write makes the next completion ask again
    got("compact ")
    assert len([c for c in client.calls if c[0] == "retention"]) == 2
    client.info = client_mod.ServerUnavailable("down")
    comp.wrote(None)
    assert got("compact ") == []  # never raises

    (tmp_path / "dump-one.jsonl").write_text("")
    (tmp_path / "dump two.jsonl").write_text("")
    texts = sorted(t for t, _ in got(f"import {tmp_path}/dump"))
    assert texts == [f"'{tmp_path}/dump two.jsonl'", f"{tmp_path}/dump-one.jsonl"]
    assert [t for t, _ in got(f"export {tmp_path}/dump-")] == [f"{tmp_path}/dump-one.jsonl"]


def test_lexer_styles_positions_and_files():
    frags = {t: s for s, t in highlight("watch app/ --from 12; compact x9; retention 3; "
                                        "export out.jsonl app/")}
    assert frags["watch"] == "class:kvs.command" and frags["app/"] == "class:kvs.key"
    assert frags["--from"] == "class:kvs.option" and frags["12"] == "class:kvs.version"
    assert "kvs.bad" in frags["x9"] and frags["3"] == "class:kvs.version"
    assert frags["out.jsonl"] == "class:kvs.value"


def test_progress_bar_only_on_a_terminal_and_only_for_long_runs():
    from rich.console import Console
    from kvs_shell.render import ProgressBar
    assert Renderer("table", out=io.StringIO(), err=io.StringIO()).progress("x", "keys") \
        .__enter__() is None  # piped: no bar
    now = [0.0]
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with ProgressBar(console, "importing", "versions", delay=0.5, clock=lambda: now[0]) as bar:
        bar(10, 100)  # a short run shows nothing
        assert not bar.shown
        now[0] = 1.0
        bar(50, 100)
        assert bar.shown
    assert "importing" in buf.getvalue() and "50/100 versions" in buf.getvalue()
