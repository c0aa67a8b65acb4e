"""The command table: name, aliases, arguments, help text and handler of every command.

A handler takes the :class:`Context` (the running shell) and the command's
words, and returns a view (``views.py``) that the formatters print.  Invalid input
raises :class:`UsageError`; a server that cannot be reached raises a
``client.ClientError``.  A -1 / blank answer from the server is a view with the
reason in ``error`` (a failed command).

Adding a command: a handler returning a view, and its entry in :data:`COMMANDS`.

No grpc here: the client is reached only through the Context.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol, Sequence

from . import timetravel as TT
from . import views as V
from .parser import quote
from .views import MessageView, StreamView, View

MIN_LEN = 3
INT32_MAX = 2**31 - 1


class UsageError(ValueError):
    """Invalid input: wrong arguments, a too-short key, a bad version..."""


class Context(Protocol):  # what handlers need from the shell
    client: Any
    timing: bool

    def connect(self, spec: str) -> str: ...
    def wrote(self, keys: Sequence[str]) -> None: ...
    def request_exit(self) -> None: ...
    def identified(self, identity: Any) -> None: ...
    def saw_nodes(self, nodes: Iterable[tuple[str, str]]) -> None: ...  # for completion
    # optional (a context without them gets the defaults, see _interactive/_progress):
    # interactive: bool -- a person at the prompt (Ctrl-C ends a watch, not the shell)
    # def progress(self, label: str, unit: str) -> ContextManager[callback | None]


# argument kinds drive completion and highlighting; a kind with a "|" is a fixed choice
KEY, VALUE, VERSION, PREFIX, KEYVER, PAIRS, ONOFF, COMMAND, SERVER = (
    "key", "value", "version", "prefix", "key[@ver]", "pairs", "on|off", "command", "server")
LEVEL, MEMBER_ACTION, NODE = "local|linearizable", "list|remove", "node"
TIME, COUNT, OPTION = "time", "count", "option"  # an option's value kinds, and its name
POSITION, KEEP, FILE = "position", "keep", "file"  # a log position, versions kept, a path


def choices(kind: str | None) -> tuple[str, ...]:
    """The words a fixed-choice kind accepts (none for the other kinds)."""
    return tuple(kind.split("|")) if kind and "|" in kind else ()


@dataclass(frozen=True)
class Option:
    name: str  # --limit
    kind: str  # the kind of its value (TIME, COUNT)
    summary: str


@dataclass
class Command:
    name: str
    aliases: tuple[str, ...]
    syntax: str
    summary: str
    meaning: str
    example: str
    handler: Callable[..., View]
    args: tuple[str, ...] = ()  # kinds of the positional args; PAIRS/KEYVER repeat
    min_args: int = 0
    max_args: int | None = 0  # None: unlimited
    options: tuple[Option, ...] = ()  # a handler with options takes (ctx, args, opts)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def option(self, word: str) -> Option | None:
        return next((o for o in self.options if o.name == word), None)

    def arg_kind(self, index: int) -> str | None:
        """The kind of the positional argument number ``index`` (0-based)."""
        if not self.args:
            return None
        if self.args[-1] == PAIRS:
            return KEY if index % 2 == 0 else VALUE
        if self.args[-1] == KEYVER and index >= len(self.args) - 1:
            return KEYVER
        return self.args[index] if index < len(self.args) else None


# ---------------------------------------------------------------------------
# validation (the server checks too; we refuse early with a clear message)
# ---------------------------------------------------------------------------
def check_key(key: str) -> str:
    if len(key) < MIN_LEN:
        raise UsageError(f"invalid key {key!r}: keys have at least {MIN_LEN} characters")
    return key


def check_value(value: str) -> str:
    if len(value) < MIN_LEN:
        raise UsageError(f"invalid value {value!r}: values have at least {MIN_LEN} characters")
    return value


def parse_version(text: str, what: str = "version") -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected a whole number") from None
    if v < 1 or v > INT32_MAX:
        raise UsageError(f"invalid {what} {v}: versions are 1..{INT32_MAX}")
    return v


def split_keyver(word: str) -> tuple[str, int | None]:
    """``key@3`` -> (key, 3); ``key`` -> (key, None). Only an all-digit suffix is a version."""
    head, sep, tail = word.rpartition("@")
    if sep and tail.isdigit() and head:
        return check_key(head), parse_version(tail)
    return check_key(word), None


def parse_count(text: str, what: str = "--limit") -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected a whole number") from None
    if n < 1:
        raise UsageError(f"invalid {what} {n}: at least 1")
    return n


def split_options(cmd: Command, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional words and {option name: value}.  ``--opt VALUE`` or ``--opt=VALUE``; a
    time may be written unquoted (``--at 5m ago``); ``--`` ends the options."""
    if not cmd.options:
        return args, {}
    pos: list[str] = []
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            pos += args[i + 1:]
            break
        name, eq, value = word.partition("=")
        opt = cmd.option(name) if word.startswith("--") else None
        if word.startswith("--") and opt is None:
            known = ", ".join(o.name for o in cmd.options)
            raise UsageError(f"{cmd.name}: unknown option {name!r} (known: {known})")
        if opt is None:
            pos.append(word)
        elif eq:
            opts[opt.name] = value
        elif i + 1 < len(args):
            i += 1
            opts[opt.name] = args[i]
            if opt.kind == TIME and i + 1 < len(args) and args[i + 1].lower() == "ago":
                i += 1
                opts[opt.name] += " ago"
        else:
            raise UsageError(f"{cmd.name}: option {opt.name} needs a value")
        i += 1
    return pos, opts


def word_kinds(cmd: Command, words: list[str]) -> list[str | None]:
    """The kind of each argument word (option names are OPTION; a value gets its option's
    kind), for completion and highlighting."""
    kinds: list[str | None] = []
    index = 0
    pending: Option | None = None
    for i, word in enumerate(words):
        if pending is not None:
            kinds.append(pending.kind)
            # "--at 5m ago": the trailing "ago" belongs to the time
            pending = pending if (pending.kind == TIME and i + 1 < len(words)
                                  and words[i + 1].lower() == "ago") else None
        elif cmd.options and word.startswith("--") and word != "--":
            kinds.append(OPTION)
            opt = cmd.option(word.partition("=")[0])
            pending = opt if opt is not None and "=" not in word else None
        else:
            kinds.append(cmd.arg_kind(index))
            index += 1
    return kinds


def _arity(cmd: Command, args: list[str]) -> None:
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        raise UsageError(f"usage: {cmd.syntax}")


# ---------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------
def do_put(ctx: Context, args: list[str]) -> View:
    key, value = check_key(args[0]), check_value(args[1])
    r = ctx.client.put(key, value)
    ctx.wrote([key])
    return V.written_view("put", r, "" if r.ok else _refused("put", key, r.error, r.no_quorum))


def do_get(ctx: Context, args: list[str], opts: dict | None = None) -> View:
    key = check_key(args[0])
    if opts and "--at" in opts:
        if len(args) > 1:
            raise UsageError("get: give either VERSION or --at TIME")
        return _get_at(ctx, key, opts["--at"])
    version = parse_version(args[1]) if len(args) > 1 else None
    r = ctx.client.get(key, version)
    # not found is a normal answer; not served is a failure
    return V.read_view(r, _not_read("get", key, r.error, r.no_quorum) if _unserved(r) else "")


def _time(text: str) -> float:
    try:
        return TT.parse_time(text)
    except TT.TimeError as exc:
        raise UsageError(str(exc)) from None


def _get_at(ctx: Context, key: str, text: str) -> View:
    when = _time(text)
    v, top = TT.version_at(ctx.client, key, when)
    return V.as_of_view(TT.AsOf(key, when, v, top))  # not found is a normal answer


def do_del(ctx: Context, args: list[str]) -> View:
    key = check_key(args[0])
    version = parse_version(args[1]) if len(args) > 1 else None
    r = ctx.client.delete(key, version)
    ctx.wrote([key])
    return V.written_view("del", r, "" if r.ok else _refused("del", key, r.error, r.no_quorum))


def do_mput(ctx: Context, args: list[str]) -> View:
    if len(args) % 2:
        raise UsageError("usage: mput KEY VALUE [KEY VALUE ...] (pairs: the last value is missing)")
    pairs = [(check_key(args[i]), check_value(args[i + 1])) for i in range(0, len(args), 2)]
    rows = ctx.client.mput(pairs)
    ctx.wrote([k for k, _ in pairs])
    return _batch("mput", rows)


def do_mget(ctx: Context, args: list[str]) -> View:
    items = [split_keyver(w) for w in args]
    rows = ctx.client.mget(items)
    bad = [r for r in rows if _unserved(r)]
    return V.reads_view(rows, "; ".join(_not_read("mget", r.key, r.error, r.no_quorum)
                                        for r in bad))


def _unserved(r) -> bool:
    """A blank answer with a reason: the server did not serve the read (not in step, no
    quorum for a linearizable read), which is not the same as "not found"."""
    return not r.found and bool(r.error)


def do_mdel(ctx: Context, args: list[str]) -> View:
    items = [split_keyver(w) for w in args]
    rows = ctx.client.mdel(items)
    ctx.wrote([k for k, _ in items])
    return _batch("mdel", rows)


def _batch(op: str, rows) -> View:
    bad = [r for r in rows if not r.ok]
    return V.batch_view(op, rows, "; ".join(_refused(op, r.key, r.error, r.no_quorum)
                                            for r in bad))


NO_QUORUM_WRITE = ("not acknowledged: the server cannot reach a majority of the cluster's "
                   "voting members; try again once `status` shows a leader")
NO_QUORUM_READ = ("a linearizable read needs a majority of the voting members; "
                  "`consistency local` reads what this server has")


def _refused(op: str, key: str, reason: str, no_quorum: bool = False) -> str:
    text = f"{op} {key}: refused by the server" + (f": {reason}" if reason else " (no reason given)")
    return text + (f" ({NO_QUORUM_WRITE})" if no_quorum else "")


def _not_read(op: str, key: str, reason: str, no_quorum: bool = False) -> str:
    text = f"{op} {key}: the server did not serve the read: {reason}"
    return text + (f" ({NO_QUORUM_READ})" if no_quorum else "")


def do_snapshot(ctx: Context, args: list[str]) -> View:
    version = parse_version(args[0]) if args else 0
    rows, err = ctx.client.snapshot(version)
    if err:  # the server sends a reason only when it did not serve the snapshot
        return View(error=_not_read("snapshot", f"at version {version or 'latest'}", err,
                                    "no quorum" in err.lower()))
    return V.snapshot_view(rows, version, _written_through(ctx, rows))


SNAPSHOT_DETAILS = 100  # up to this many keys, snapshot also shows node / time of each row


def _written_through(ctx: Context, rows) -> dict:
    """key -> VersionInfo of the version in the snapshot (node, time), for small snapshots.
    Best effort: a key whose history cannot be read simply has no details."""
    if not rows or len(rows) > SNAPSHOT_DETAILS:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    def one(r):
        try:
            h = ctx.client.history(r.key)
        except Exception:  # noqa: BLE001 - details are optional
            return r.key, None
        return r.key, next((v for v in h.versions if v.version == r.version), None)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return {k: v for k, v in pool.map(one, rows) if v is not None}


def do_history(ctx: Context, args: list[str], opts: dict | None = None) -> View:
    key = check_key(args[0])
    opts = opts or {}
    limit = parse_count(opts["--limit"]) if "--limit" in opts else None
    since = _time(opts["--since"]) if "--since" in opts else None
    return V.history_view(TT.collect_history(ctx.client, key, limit, since))


def do_diff(ctx: Context, args: list[str]) -> View:
    key = check_key(args[0])
    v1 = parse_version(args[1])
    v2 = parse_version(args[2]) if len(args) > 2 else None
    old, top = TT.exact_version(ctx.client, key, v1)
    new, top2 = TT.exact_version(ctx.client, key, v2)
    top = max(top, top2)
    missing = [f"version {v}" for v, got in ((v1, old), (v2, new)) if got is None and v]
    if new is None and v2 is None:
        missing.append("a live version")
    if missing:
        why = ("the key was never written" if not top
               else f"not live (removed, or never written; highest ever {top})")
        return View(error=f"diff {key}: {' and '.join(missing)}: {why}")
    return V.diff_view(TT.diff_versions(key, old, new))


def do_keys(ctx: Context, args: list[str]) -> View:
    prefix = args[0] if args else ""
    keys: list[str] = []
    after = ""
    while True:  # page through the whole listing
        page = ctx.client.list_keys(prefix, limit=1000, start_after=after)
        keys.extend(page.keys)
        if not page.truncated or not page.keys:
            break
        after = page.keys[-1]
    return V.keys_view(prefix, keys)


def do_status(ctx: Context, args: list[str]) -> View:
    nodes = ctx.client.cluster_status()
    seen = node_names(m for n in nodes for m in n.members)
    ctx.saw_nodes(seen + [(n.node_id, n.advertised or n.address) for n in nodes if n.node_id])
    return V.status_view(nodes)


def node_names(members) -> list[tuple[str, str]]:
    """(node id, description) of members, for completing NODE (``Context.saw_nodes``)."""
    return [(m.node_id, " ".join(x for x in (m.address, m.role) if x)) for m in members]


def do_member(ctx: Context, args: list[str]) -> View:
    action = args[0].lower() if args else "list"
    if action == "list":
        if len(args) > 1:
            raise UsageError("usage: member list")
        ml = ctx.client.member_list()
        ctx.saw_nodes(node_names(ml.members))
        return V.member_list_view(ml)
    if action == "remove":
        if len(args) != 2:
            raise UsageError("usage: member remove NODE")
        node = args[1]
        r = ctx.client.member_remove(node)
        if not r.ok:
            return V.member_removed_view(r, _refused("member remove", node, r.error,
                                                     r.no_quorum))
        r.members = r.members or _best_effort_members(ctx)
        ctx.saw_nodes(node_names(r.members))
        return V.member_removed_view(r)
    raise UsageError("usage: member list | member remove NODE")


def _best_effort_members(ctx: Context) -> list:
    """The list after a removal whose answer did not carry it (the removal itself worked)."""
    try:
        return ctx.client.member_list().members
    except Exception:  # noqa: BLE001 - the list is a courtesy
        return []


def do_whoami(ctx: Context, args: list[str]) -> View:
    ident = ctx.client.whoami()
    ctx.identified(ident)
    return V.whoami_view(ident, ctx.client.security.describe())


def do_consistency(ctx: Context, args: list[str]) -> View:
    if args:
        level = args[0].lower()
        if level not in choices(LEVEL):
            raise UsageError("usage: consistency [local|linearizable]")
        ctx.client.consistency = level
    what = ("reads confirm with a quorum that they see every acknowledged write (ReadIndex)"
            if ctx.client.consistency == "linearizable"
            else "reads answer from the server's own state")
    return MessageView(message=f"consistency is {ctx.client.consistency}: {what}")


def do_connect(ctx: Context, args: list[str]) -> View:
    return MessageView(message=ctx.connect(args[0]))


def do_timing(ctx: Context, args: list[str]) -> View:
    if args:
        word = args[0].lower()
        if word not in ("on", "off"):
            raise UsageError("usage: timing on|off")
        ctx.timing = word == "on"
    else:
        ctx.timing = not ctx.timing
    return MessageView(message=f"timing is {'on' if ctx.timing else 'off'}")


def do_help(ctx: Context, args: list[str]) -> View:
    if args:
        cmd = lookup(args[0])
        if cmd is None:
            raise UsageError(f"unknown command {args[0]!r}; type help for the list")
        return V.help_view([cmd], detail=True)
    return V.help_view(COMMANDS, detail=False)


def do_exit(ctx: Context, args: list[str]) -> View:
    ctx.request_exit()
    return View()


# ---------------------------------------------------------------------------
# watch, export / import, compaction and retention
# ---------------------------------------------------------------------------
WATCH_RECONNECT_TIMEOUT = 30.0  # s with no server answering before a watch fails
WATCH_BACKOFF = 0.05  # s before the first new try after a break (doubling, at most 1 s)


def parse_position(text: str, what: str = "position") -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected a log position (a whole "
                         "number, as history's seq column shows)") from None
    if n < 1:
        raise UsageError(f"invalid {what} {n}: positions start at 1")
    return n


def parse_keep(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"invalid retention {text!r}: expected the number of versions to "
                         "keep per key (0: all)") from None
    if n < 0 or n > INT32_MAX:
        raise UsageError(f"invalid retention {n}: 0 (keep every version) to {INT32_MAX}")
    return n


def _interactive(ctx: Context) -> bool:
    return bool(getattr(ctx, "interactive", False))


def _progress(ctx: Context, label: str, unit: str) -> ContextManager:
    """A progress callback from the shell (a bar on a terminal), or None."""
    make = getattr(ctx, "progress", None)
    return make(label, unit) if make is not None else contextlib.nullcontext(None)


def _watch_cmd(prefix: str, start: int | None = None) -> str:
    """The command that watches ``prefix`` (from ``start``), for hints."""
    words = ["watch"] + ([quote(prefix)] if prefix else []) + (
        ["--from", str(start)] if start else [])
    return " ".join(words)


def do_watch(ctx: Context, args: list[str], opts: dict | None = None) -> View:
    prefix = args[0] if args else ""
    opts = opts or {}
    start = parse_position(opts["--from"], "--from") if "--from" in opts else None
    from .watching import Follower
    follower = Follower(ctx.client, prefix, start, reconnect_timeout=WATCH_RECONNECT_TIMEOUT,
                        initial_backoff=WATCH_BACKOFF)
    view = StreamView()
    view.items = _watch_items(ctx, follower, view, prefix, start)
    return view


def _watch_items(ctx: Context, follower, view: StreamView, prefix: str,
                 start: int | None) -> Iterator[View]:
    """The changes as views (rows), with dim lines for what happens to the stream.
    Ctrl-C (or SIGTERM outside the interactive shell) ends it as a success."""
    from .client import ClientError, Compacted
    from .watching import Connected, Reconnecting, Resumed

    what = f"keys starting with {prefix!r}" if prefix else "every key"
    shown = 0

    def dim(message: str) -> MessageView:
        return MessageView(message=message, style="dim")

    try:
        for ev in follower:
            if isinstance(ev, Connected):
                yield dim(f"watching {what} on {ev.server or ctx.client.label} from position "
                          f"{ev.next_position} (Ctrl-C stops)")
                yield V.watch_header_view()
            elif isinstance(ev, Reconnecting):
                why = "the server dropped this watch for falling behind" if ev.lagged else ev.reason
                yield dim(f"reconnecting (attempt {ev.attempt}): {why}; resuming at position "
                          f"{ev.next_position}")
            elif isinstance(ev, Resumed):
                yield dim(f"resumed on {ev.server or ctx.client.label} at position "
                          f"{ev.next_position}")
            else:
                shown += 1
                yield V.change_view(ev)
    except KeyboardInterrupt:  # Ctrl-C: the normal end of a watch
        follower.stop()
        if not _interactive(ctx):
            ctx.request_exit()  # a signal ends the script too
        resume = follower.next_position
        yield dim(f"watch stopped after {V.plural(shown, 'change')}"
                  + (f"; `{_watch_cmd(prefix, resume)}` goes on from here" if resume else ""))
    except Compacted as exc:
        asked = follower.next_position or start or 0
        view.error = (
            f"watch {what}: position {asked} is compacted: the oldest position the servers "
            f"still have is {exc.oldest}. Re-read the current state (`export FILE"
            f"{' ' + quote(prefix) if prefix else ''}` records the position P it is as of), "
            f"then `{_watch_cmd(prefix)} --from` P+1; or `{_watch_cmd(prefix)}` from now")
    except ClientError as exc:
        resume = follower.next_position
        view.error = (f"watch {what}: {exc}"
                      + (f"; `{_watch_cmd(prefix, resume)}` resumes without a gap"
                         if resume else ""))
    finally:
        follower.stop()


def do_export(ctx: Context, args: list[str]) -> View:
    path = os.path.expanduser(args[0])
    prefix = args[1] if len(args) > 1 else ""
    from .client import ClientError
    from .transfer import export_to
    try:
        with _progress(ctx, f"exporting {prefix!r}" if prefix else "exporting", "keys") as bar:
            summary = export_to(ctx.client, path, prefix, progress=bar)
    except OSError as exc:
        return View(error=f"export {args[0]}: cannot write the file: {exc.strerror or exc}")
    except ClientError as exc:
        return View(error=f"export {args[0]}: {exc} (no file was written)")
    return V.export_view(summary)


def do_import(ctx: Context, args: list[str]) -> View:
    path = os.path.expanduser(args[0])
    from .transfer import BadExportFile, ImportFailed, import_from
    try:
        with _progress(ctx, "importing", "versions") as bar:
            summary = import_from(ctx.client, path, progress=bar)
    except BadExportFile as exc:
        return View(error=f"import {args[0]}: not a valid export file: {exc}; nothing was "
                          "imported")
    except ImportFailed as exc:
        ctx.wrote(None)
        return V.import_view(exc.summary, error=(
            f"import {args[0]}: {exc}. Rerun is safe: `import {quote(args[0])}` again skips "
            "what is in and goes on"))
    except UnicodeDecodeError:
        return View(error=f"import {args[0]}: not a valid export file: not UTF-8 text; "
                          "nothing was imported")
    except OSError as exc:
        return View(error=f"import {args[0]}: cannot read the file: {exc.strerror or exc}")
    ctx.wrote(None)  # keys unknown here: every cached listing is due again
    return V.import_view(summary)


def do_compact(ctx: Context, args: list[str]) -> View:
    position = parse_position(args[0])
    from .client import FailedPrecondition, InvalidArgument
    try:
        info = ctx.client.compact(position)
    except (InvalidArgument, FailedPrecondition) as exc:
        return View(error=f"compact {position}: {exc}",
                    records=[{"op": "compact", "position": position, "ok": False,
                              "error": str(exc)}])
    ctx.wrote(None)
    return V.retention_view(info, "compact", note=(
        f"compacted at position {position}: {V.plural(info.dropped, 'version')} dropped; "
        f"watches can start at position {info.oldest_watch} or later"))


def do_retention(ctx: Context, args: list[str]) -> View:
    if not args:
        return V.retention_view(ctx.client.retention())
    keep = parse_keep(args[0])
    from .client import InvalidArgument
    try:
        info = ctx.client.retention(keep)
    except InvalidArgument as exc:
        return View(error=f"retention {keep}: {exc}")
    ctx.wrote(None)
    policy = f"at most {V.plural(keep, 'live version')} per key" if keep else "every version"
    return V.retention_view(info, "retention set", note=(
        f"now keeping {policy}: {V.plural(info.dropped, 'version')} dropped"))


AT_OPTION = Option("--at", TIME, "the version live at TIME (ISO 8601 or 5m ago)")

COMMANDS: list[Command] = [
    Command("put", ("insere", "set"), "put KEY VALUE", "store VALUE as the next version of KEY",
            "Stores VALUE as a new version of KEY (the first insert is version 1, each further "
            "insert +1) and prints the version it got. Keys and values have at least 3 characters; "
            "quote values with spaces.", 'put user:1 "Ada Lovelace"', do_put,
            (KEY, VALUE), 2, 2),
    Command("get", ("consulta",), "get KEY [VERSION | --at TIME]",
            "read KEY (latest, the greatest version <= VERSION, or as of TIME)",
            "Reads KEY. Without VERSION: the latest version. With VERSION: the greatest live version "
            "<= VERSION, and the answer says which version actually answered. With --at TIME: "
            "the version that was live at TIME (the greatest live version written at or "
            "before it); TIME is ISO 8601 (2026-12-01T10:00:00Z; local time without an offset) "
            "or relative (30s ago, 5m ago, 2h ago, 3d ago). A key or version that is not found "
            "is a normal answer.", "get user:1 --at 5m ago", do_get,
            (KEY, VERSION), 1, 2, (AT_OPTION,)),
    Command("del", ("remove", "rm", "delete"), "del KEY [VERSION]", "remove one version, or every version of KEY",
            "Without VERSION removes every live version of KEY and prints the highest one removed; "
            "with VERSION removes exactly that version. Removed version numbers are never reused. "
            "Removing an unknown key or version is refused by the server (a failed command).",
            "del user:1 1", do_del, (KEY, VERSION), 1, 2),
    Command("mput", ("insere-v",), "mput KEY VALUE [KEY VALUE ...]", "put several pairs in one stream",
            "Puts every KEY VALUE pair through one InsereVarias stream; one answer per pair, in "
            "order. Fails if any pair was refused.", "mput k01 v01 k02 v02", do_mput,
            (PAIRS,), 2, None),
    Command("mget", ("consulta-v",), "mget KEY[@VERSION] ...", "get several keys in one stream",
            "Reads every KEY (at VERSION when written KEY@VERSION; only an all-digit suffix after "
            "the last @ is a version) through one ConsultaVarias stream.", "mget k01 k02@1",
            do_mget, (KEYVER,), 1, None),
    Command("mdel", ("remove-v",), "mdel KEY[@VERSION] ...", "remove several keys/versions in one stream",
            "Removes every KEY (only VERSION when written KEY@VERSION) through one RemoveVarias "
            "stream. Fails if any removal was refused.", "mdel k01 k02@1", do_mdel,
            (KEYVER,), 1, None),
    Command("snapshot", (), "snapshot [VERSION]", "every key at VERSION (default: latest)",
            "Lists every key with its value at the greatest live version <= VERSION (the latest "
            "when VERSION is left out). Keys with nothing qualifying are left out.", "snapshot 2",
            do_snapshot, (VERSION,), 0, 1),
    Command("history", ("hist",), "history KEY [--limit N] [--since TIME]",
            "live versions of KEY, newest first",
            "Shows the live versions of KEY, newest first: version, value, size, the server it "
            "was written through and when. --limit N: only the N newest; --since TIME: only "
            "those written at or after TIME (ISO 8601, or 5m ago / 2h ago / 3d ago). The "
            "history is read in pages, so any number of versions can be shown.",
            "history user:1 --limit 10", do_history, (KEY,), 1, 1,
            (Option("--limit", COUNT, "only the N newest versions"),
             Option("--since", TIME, "only versions written at or after TIME"))),
    Command("diff", (), "diff KEY V1 [V2]", "what changed between two versions of KEY",
            "Shows a unified diff from version V1 to version V2 of KEY (V2: the latest when left "
            "out). JSON objects and arrays are pretty-printed (sorted keys) first, so the diff "
            "shows the fields that changed. A version that is not live is an error.",
            "diff user:1 1 3", do_diff, (KEY, VERSION, VERSION), 2, 3),
    Command("watch", (), "watch [PREFIX] [--from POSITION]",
            "follow the changes under PREFIX as they are committed",
            "Prints every change (put or remove) to a key starting with PREFIX as it is "
            "committed, one row each: position, time, op (put, del, del* = every version), "
            "key, version, node it was written through, value. Without --from it starts "
            "from now; --from POSITION replays from that log position on (history's seq "
            "column) and goes on live. With several --servers the watch moves to another "
            "server when its server fails and resumes at the next position: no change is "
            "missed or shown twice. Ctrl-C stops it. Piped, or with --format plain/json, it "
            "writes one JSON object per change (position, op, key, version, value, node, "
            "written_at, all_versions), flushed at once, like etcdctl watch. A position "
            "older than the servers keep (compacted) fails, naming the oldest available one.",
            "watch app/ --from 120", do_watch, (PREFIX,), 0, 1,
            (Option("--from", POSITION, "replay from this log position (history's seq)"),)),
    Command("export", (), "export FILE [PREFIX]",
            "save every live version (of keys under PREFIX) to a file",
            "Writes every live version of every key starting with PREFIX (all keys without "
            "it), with when and through which node it was written, to FILE as JSON Lines, "
            "all as of one log position (the first line records it). The file is written "
            "aside and renamed into place when complete (mode 0600). A progress bar shows on "
            "a terminal for long runs.", "export backup.jsonl app/", do_export,
            (FILE, PREFIX), 1, 2),
    Command("import", (), "import FILE", "write the versions of an export file",
            "Checks the whole file first (a bad line is reported by number and nothing is "
            "written), then writes its versions in batches of 500 lines. On a key that is "
            "new here the version numbers are kept (gaps are filled with placeholders that "
            "are removed at once); a key that has versions here already gets the file's "
            "appended (reported as renumbered). Each batch carries an idempotency id, so "
            "running the same import again after a failure is safe: what is in is skipped.",
            "import backup.jsonl", do_import, (FILE,), 1, 1),
    Command("compact", (), "compact POSITION",
            "drop every version superseded before POSITION (admin)",
            "Per key, every version superseded by a version written before log POSITION is "
            "dropped on every server; the version live at POSITION stays, with everything "
            "newer. Watches can then start at POSITION or later. TAB offers the current "
            "position (`retention` shows it). Beyond the last position, or at or below the "
            "last compaction, it is refused.", "compact 1200", do_compact, (POSITION,), 1, 1),
    Command("retention", (), "retention [N]",
            "show the retention policy, or keep N versions per key (admin)",
            "Without N shows how many live versions each key keeps (0: all), the position of "
            "the last compaction, the current log position and the oldest position a watch "
            "can start at. With N (admin) keeps at most the newest N live versions of every "
            "key from now on, on every server, and says how many versions that dropped; "
            "0 keeps them all again.", "retention 10", do_retention, (KEEP,), 0, 1),
    Command("keys", ("ls",), "keys [PREFIX]", "list live keys (starting with PREFIX)",
            "Lists every key that has at least one live version, sorted, optionally only those "
            "starting with PREFIX.", "keys user:", do_keys, (PREFIX,), 0, 1),
    Command("status", (), "status", "every server: role, term, commit/applied index, state, members",
            "Asks every configured server (and every member or peer they report) for its status: "
            "up or down, node id, Raft role and term, commit index, applied index, lag "
            "(commit - applied), state (in-step, catching-up, no-quorum, joining, removed, "
            "starting), key count, the leader it knows, and the members each server knows.",
            "status", do_status, (), 0, 0),
    Command("member", ("members",), "member [list | remove NODE]", "list the cluster's members, or remove one",
            "member list (also plain `member`) shows every member of the Raft configuration: node "
            "id, address, role (voter or learner), whether it was seen online recently, the "
            "leader's match index of its log, and which one leads. member remove NODE asks the "
            "cluster to remove NODE (a configuration change through the log) and shows the new "
            "list; the cluster may refuse (e.g. an unknown node, or no quorum), which is a failed "
            "command.", "member remove node-9003", do_member, (MEMBER_ACTION, NODE), 0, 2),
    Command("whoami", (), "whoami", "who the server takes you for, and what you may do",
            "Asks the server which identity it sees for this shell (from the token or the "
            "client certificate), its roles, the key prefixes it may read and write, how it "
            "was authenticated, and whether the connection uses TLS. A denied command says "
            "`not authenticated` (no or unknown credential) or `permission denied` (known, "
            "but the roles do not allow it).", "whoami", do_whoami, (), 0, 0),
    Command("consistency", (), "consistency [local|linearizable]", "how reads are served (show or switch)",
            "local (the default): get, mget and snapshot answer from the state of the server "
            "that takes the call. linearizable: they send kvs-consistency: linearizable, and the "
            "server answers only after confirming with a quorum that it has every write "
            "acknowledged before the read started (slower; fails without a quorum). Without "
            "argument shows the current mode.", "consistency linearizable", do_consistency,
            (LEVEL,), 0, 1),
    Command("connect", (), "connect PORT|HOST:PORT|P1,P2,...", "switch to other server(s)",
            "Connects to another server, or to a cluster of servers (round robin with failover), "
            "without restarting the shell.", "connect 9000,9001,9002", do_connect,
            (SERVER,), 1, 1),
    Command("timing", (), "timing [on|off]", "show how long each command took",
            "Turns the elapsed-time line after each command on or off (toggles without argument).",
            "timing on", do_timing, (ONOFF,), 0, 1),
    Command("help", ("?",), "help [COMMAND]", "list commands, or explain one",
            "Without argument lists every command; with one shows its syntax, meaning and an "
            "example.", "help get", do_help, (COMMAND,), 0, 1),
    Command("exit", ("quit", r"\q"), "exit", "leave the shell (Ctrl-D too)",
            "Leaves the shell. The servers keep running.", "exit", do_exit, (), 0, 0),
]

_BY_NAME: dict[str, Command] = {}
for _c in COMMANDS:
    for _n in _c.names:
        _BY_NAME[_n] = _c
WRITE_COMMANDS = {"put", "del", "mput", "mdel"}


def lookup(name: str) -> Command | None:
    return _BY_NAME.get(name.lower())


def all_names() -> list[str]:
    return sorted(_BY_NAME)


def run(ctx: Context, words: list[str]) -> View:
    """Run one command (its words, already split). Raises UsageError / client errors."""
    cmd = lookup(words[0])
    if cmd is None:
        raise UsageError(f"unknown command {words[0]!r}; type help for the list")
    args, opts = split_options(cmd, words[1:])
    _arity(cmd, args)
    return cmd.handler(ctx, args, opts) if cmd.options else cmd.handler(ctx, args)
