"""kvs_shell without a server: parser, command table, validation, renderers, completer caches,
lexer, client.sh flags and address parsing."""
from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

import pytest

from kvs_shell import client as client_mod
from kvs_shell import commands as C
from kvs_shell.client import BadTarget, KeyList, Read, Written, Client, parse_servers
from kvs_shell.compat import FlagError, parse_flags
from kvs_shell.completer import KeyCache, KVSCompleter
from kvs_shell.lexer import highlight
from kvs_shell.parser import ParseError, current_command, quote, split_commands, tokenize
from kvs_shell.render import Renderer, elide, esc_plain


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

    def connect(self, spec):
        return f"connected to {spec}"

    def wrote(self, keys):
        self.written.extend(keys)

    def request_exit(self):
        self.exited = True


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
    assert C.run(ctx, ["insere", "abc", "hello world"]).data.version == 7
    assert C.run(ctx, ["get", "abc", "3"]).ok
    miss = C.run(ctx, ["get", "missing"])
    assert miss.ok and not miss.data.found  # not found is a normal answer
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
    assert C.run(ctx, ["timing", "on"]).data == "timing is on" and ctx.timing
    C.run(ctx, ["quit"])
    assert ctx.exited


def test_split_keyver():
    assert C.split_keyver("abc@12") == ("abc", 12)
    assert C.split_keyver("a@b.com") == ("a@b.com", None)
    assert C.split_keyver("abc@") == ("abc@", None)


# ---------------------------------------------------------------------------
# renderers
# ---------------------------------------------------------------------------
def render(fmt, outcome, interactive=False):
    out, err = io.StringIO(), io.StringIO()
    Renderer(fmt, out=out, err=err, color=False, interactive=interactive, width=100).render(outcome)
    return out.getvalue(), err.getvalue()


def test_plain_is_one_line_per_result_and_escapes():
    o = C.Outcome("mget", [Read("abc", "two\nlines\tand\\", 3, None), Read("nop", "", 0, 2)])
    out, _ = render("plain", o)
    assert out == "abc\t3\ttwo\\nlines\\tand\\\\\nnop@2\t(not found)\n"
    assert esc_plain("a\rb") == "a\\rb"


def test_json_lines():
    out, _ = render("json", C.Outcome("get", Read("abc", "v", 3, 5)))
    assert json.loads(out) == {"op": "get", "key": "abc", "requested": 5, "version": 3,
                               "value": "v", "found": True}
    out, _ = render("json", C.Outcome("mput", [Written("k01", 1), Written("k02", -1, "bad")]))
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[1] == {"op": "mput", "key": "k02", "requested": None, "version": -1,
                       "ok": False, "error": "bad"}


def test_table_get_says_which_version_answered():
    out, _ = render("table", C.Outcome("get", Read("abc", "old", 2, 5)))
    assert "answered by version 2" in out and "asked ≤ 5" in out
    out, _ = render("table", C.Outcome("get", Read("abc", "", 0, 1)))
    assert "(not found)" in out


def test_history_table_has_all_columns():
    from kvs_shell.client import History, VersionInfo
    h = History("abc", [VersionInfo(2, "x" * 500, 1.7e9, "node-1", 9),
                        VersionInfo(1, "short", 1.7e9, "node-2", 3)], 2)
    out, _ = render("table", C.Outcome("history", h))
    for word in ("version", "value", "size", "node", "written", "node-1", "500 B", "…"):
        assert word in out
    assert "x" * 100 not in out  # long values are elided


def test_info_goes_to_stderr_outside_the_interactive_shell():
    out, err = render("plain", C.Outcome("info", "timing is on"))
    assert out == "" and err == "timing is on\n"
    out, err = render("table", C.Outcome("info", "timing is on"), interactive=True)
    assert "timing is on" in out


def test_elide():
    assert elide("abc") == "abc"
    assert len(elide("y" * 100, 10)) == 10 and elide("y" * 100, 10).endswith("…")


# ---------------------------------------------------------------------------
# completer (fake server listing)
# ---------------------------------------------------------------------------
def test_key_cache_is_authoritative_below_a_complete_prefix():
    keys = sorted(f"user:{i:05d}" for i in range(1000)) + ["zeta-key"]
    calls = []

    def fetch(prefix, limit, timeout):
        calls.append(prefix)
        match = [k for k in keys if k.startswith(prefix)]
        return KeyList(match[:limit], len(match) > limit)

    cache = KeyCache(fetch, limit=200)
    assert cache.complete("zet") == ["zeta-key"]
    assert cache.complete("zeta") == ["zeta-key"] and calls == ["zet"]  # no second listing
    got = cache.complete("user:00")  # truncated listing: first 100 shown
    assert got == keys[:100] and calls == ["zet", "user:00"]
    cache.complete("user:00")
    assert calls == ["zet", "user:00"]
    cache.add(["user:00000a"])
    assert "user:00000a" in cache.lookup("user:00000")  # visible at once, before any listing
    # a write makes entries stale: answered at once, refreshed in the background
    cache.invalidate()
    assert cache.wait_idle(5)
    assert calls.count("user:00") == 2


def test_key_cache_merge_drops_deleted_keys():
    cache = KeyCache(lambda *a: KeyList([], False))
    cache.merge("a", ["aa1", "aa2", "ab1"], False)
    cache.merge("b", ["bb1"], False)
    cache.merge("aa", ["aa2"], False)  # aa1 was deleted
    assert cache.lookup("") == ["aa2", "ab1", "bb1"]
    cache.merge("", ["aa2", "ab1"], True)  # truncated: only up to ab1 is known
    assert cache.lookup("") == ["aa2", "ab1", "bb1"]


def test_completion_of_100k_cached_keys_is_fast():
    keys = [f"k{i:06d}" for i in range(100_000)]
    cache = KeyCache(lambda *a: KeyList([], False))
    cache.merge("", keys, False)
    comp = KVSCompleter(lambda: None)
    comp.keys = cache
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
    """Fake KVS stub over round robin: Insere answers version 1; the first ``stale``
    Consultas come from a server that has not applied it yet."""

    class _Call:
        def peer(self):
            return "ipv4:127.0.0.1:9000"

        def trailing_metadata(self):
            return ()

    def __init__(self, stale: int):
        self.stale, self.reads = stale, 0
        self.metadata: list = []  # of every call, in order
        outer = self

        class _Method:
            def __init__(self, fn):
                self.fn = fn

            def with_call(self, request, timeout=None, metadata=None):
                outer.metadata.append(metadata)
                return self.fn(request), outer._Call()

        self.Insere = _Method(lambda r: SimpleNamespace(versao=1))
        self.Remove = _Method(lambda r: SimpleNamespace(versao=1))

        def consulta(r):
            self.reads += 1
            if self.reads <= self.stale:
                return SimpleNamespace(chave=r.chave, valor="", versao=0)
            return SimpleNamespace(chave=r.chave, valor="v1", versao=1)
        self.Consulta = _Method(consulta)


def test_round_robin_client_reads_its_own_writes_from_a_lagging_server():
    c = Client(["127.0.0.1:9000", "127.0.0.1:9001"])
    try:
        c._kvs = fake = _LaggingServers(stale=3)
        assert c.put("k1", "v1").version == 1
        got = c.get("k1")
        assert (got.value, got.version) == ("v1", 1) and fake.reads == 4
        # an explicit version, or a key this session did not write, is read once
        fake.reads, fake.stale = 0, 1
        assert c.get("k1", 1).version == 0 and fake.reads == 1
        fake.reads = 0
        assert c.get("other").version == 0 and fake.reads == 1
        # after our delete the key's written version is forgotten
        assert c.delete("k1").version == 1
        fake.reads, fake.stale = 0, 1
        assert c.get("k1").version == 0 and fake.reads == 1
    finally:
        c.close()


def test_every_write_carries_a_fresh_request_id_and_reads_none():
    c = Client(["127.0.0.1:9000", "127.0.0.1:9001"])
    try:
        c._kvs = fake = _LaggingServers(stale=0)
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


def test_single_server_client_does_not_retry_reads():
    c = Client(["127.0.0.1:9000"])
    try:
        c._kvs = fake = _LaggingServers(stale=3)
        c.put("k1", "v1")
        assert c.get("k1").version == 0 and fake.reads == 1
    finally:
        c.close()


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
