"""What a command shows: a typed view, which the formatters (``formatters.py``) print as a
rich table, as tab-separated lines or as JSON lines.

A command handler returns one view:

- :class:`TableView`: title, columns, rows, caption.  Plain mode prints each row's fields
  (or ``lines`` where they differ), JSON mode the ``records`` (or the rows as objects).
- :class:`TextView`: output that is not a table (one value, a diff, help): a rich
  renderable for table mode, lines for plain mode, records for JSON.
- :class:`MessageView`: information about the shell itself (connect, timing), not a result.
- :class:`StackView`: several views one after the other (status: servers, then members).
- :class:`StreamView`: views that come over time (a watch), each printed as it comes.
- :class:`View`: records only; with an ``error`` it is a failed command whose reason the
  shell prints to stderr.

The second half of this module builds the views of the client's answers (``read_view``,
``history_view``...).  No grpc here.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

from rich.console import Group, RenderableType
from rich.text import Text

# ---------------------------------------------------------------------------
# view types
# ---------------------------------------------------------------------------
Justify = Literal["left", "right"]
Frame = Literal["box", "bare", "rules"]  # box: drawn; bare: none; rules: under the header
Cell = Any  # str / int / None, or a rich Text (styled in table mode, .plain elsewhere)


@dataclass(frozen=True)
class Column:
    name: str  # the header, and the field name of the rows as JSON objects
    justify: Justify = "left"
    style: str = ""  # rich style of every cell
    no_wrap: bool = False
    min_width: int | None = None


@dataclass(kw_only=True)
class View:
    """The base: JSON records only.  A view with an ``error`` is a failed command."""
    records: list[dict] | None = None  # JSON objects, one per line; None: derived
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(kw_only=True)
class TableView(View):
    columns: Sequence[Column] = ()
    rows: Sequence[Sequence[Cell]] = ()  # one cell per column
    title: str = ""
    caption: str | Text = ""
    lines: Sequence[Sequence[Any]] | None = None  # plain mode's fields; None: the rows
    header: bool = True
    frame: Frame = "box"
    noun: str = "row"  # for "… 12 more rows not shown"


@dataclass(kw_only=True)
class TextView(View):
    text: RenderableType | None = None  # table mode
    plain: Sequence[str] = ()  # plain mode, written as they are (see fields())


@dataclass(kw_only=True)
class MessageView(View):
    """Information, not a result: on stdout in the interactive shell, else on stderr."""
    message: str = ""
    style: str = "cyan"  # in the interactive shell (``dim`` for what happens to a stream)


@dataclass(kw_only=True)
class StackView(View):
    """Parts shown one after the other; JSON: ``records``, or else the parts' records."""
    parts: Sequence[View] = ()


@dataclass(kw_only=True)
class StreamView(View):
    """Views that come over time, each printed (and flushed) as it comes: typically a
    generator of one-row TableViews, with MessageViews for what happens to the stream.
    The generator may set ``error`` on its StreamView before it ends (a failed command)."""
    items: Iterable[View] | Iterator[View] = ()


def esc_plain(value: str) -> str:
    """Backslash, TAB, CR and newline escaped: a plain record is always one line."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t")
            .replace("\r", "\\r").replace("\n", "\\n"))


def fields(*values: Any) -> str:
    """One plain line: the values escaped and separated by TABs."""
    return "\t".join(esc_plain("" if v is None else str(v)) for v in values)


# ---------------------------------------------------------------------------
# text helpers
# ---------------------------------------------------------------------------
PREVIEW = 48  # characters of a value shown in tables
NOT_SERVED = "(not served)"


def elide(value: str, width: int = PREVIEW) -> str:
    one_line = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if len(one_line) <= width:
        return one_line
    return one_line[: width - 1] + "…"


def repr_value(value: str) -> str:
    return '"' + elide(value, 200).replace('"', '\\"') + '"'


def size_text(value: str) -> str:
    return bytes_text(len(value.encode("utf-8")))


def bytes_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def when_text(ts: float) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def iso(ts: float) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None or k in ("requested", "value")}


def _ok(*parts) -> Text:
    return Text.assemble(("OK ", "bold green"), *parts)


# ---------------------------------------------------------------------------
# reads and writes
# ---------------------------------------------------------------------------
def written_view(op: str, r, error: str = "") -> View:
    """put / del of one key: the version written, or removed."""
    rec = {"op": op, "key": r.key, **({"requested": r.requested} if op == "del" else {}),
           "version": r.version, "ok": r.ok, "error": r.error or None}
    if error:
        return View(records=[_drop_none(rec)], error=error)
    if op == "put":
        text = _ok((r.key, "bold"), " → version ", (str(r.version), "bold cyan"))
    else:
        what = (f"version {r.version}" if r.requested is not None
                else f"every version (highest {r.version})")
        text = _ok("removed ", (r.key, "bold"), " ", what)
    return TextView(records=[_drop_none(rec)], text=text, plain=[fields(r.key, r.version)])


def batch_view(op: str, rows, error: str = "") -> TableView:
    """mput / mdel: one row per key, in order (refused ones included)."""
    asked = op == "mdel"
    columns = [Column("key"), *([Column("asked", "right")] if asked else []),
               Column("version", "right"), Column("result")]
    return TableView(
        columns=columns, frame="bare", error=error, noun="key",
        rows=[(r.key, *(["all" if r.requested is None else r.requested] if asked else []),
               r.version,
               Text("ok", "green") if r.ok else Text.assemble(("refused", "red"), " ", r.error))
              for r in rows],
        lines=[(r.key, r.version) for r in rows],
        records=[_drop_none({"op": op, "key": r.key, "requested": r.requested,
                             "version": r.version, "ok": r.ok, "error": r.error or None})
                 for r in rows])


def read_record(r) -> dict:
    return _drop_none({"op": "get", "key": r.key, "requested": r.requested,
                       "version": r.version, "value": r.value if r.found else None,
                       "found": r.found, "error": r.error or None})


def read_fields(r) -> tuple:
    if r.found:
        return r.key, r.version, r.value
    return (r.key if r.requested is None else f"{r.key}@{r.requested}",
            NOT_SERVED if r.error else "(not found)")


def read_text(r) -> Text:
    asked = r.key if r.requested is None else f"{r.key}@{r.requested}"
    if not r.found:
        t = Text.assemble(("(not found) ", "yellow"), (asked, "bold"))
        if r.requested is not None:
            t.append(f" — no live version ≤ {r.requested}", style="dim")
        if r.error:
            t.append(f" ({r.error})", style="dim")
        return t
    t = Text.assemble((r.key, "bold"), " = ", (repr_value(r.value), "green"), "  ")
    if r.requested is not None and r.requested != r.version:
        t.append(f"(asked ≤ {r.requested}, answered by version {r.version})", style="cyan")
    else:
        t.append(f"(version {r.version})", style="cyan")
    return t


def read_view(r, error: str = "") -> View:
    """get: the value (not found is a normal answer; not served is an ``error``)."""
    if error:
        return View(records=[read_record(r)], error=error)
    return TextView(records=[read_record(r)], text=read_text(r), plain=[fields(*read_fields(r))])


def reads_view(rows, error: str = "") -> TableView:
    """mget: one row per key asked."""
    def value(r) -> Cell:
        if r.found:
            return elide(r.value)
        if r.error:
            return Text.assemble((NOT_SERVED, "red"), " ", r.error)
        return Text("(not found)", "yellow")

    return TableView(
        columns=[Column("key"), Column("asked", "right"), Column("version", "right"),
                 Column("value")],
        rows=[(r.key, r.requested, r.version if r.found else "-", value(r)) for r in rows],
        lines=[read_fields(r) for r in rows], records=[read_record(r) for r in rows],
        frame="bare", noun="key", error=error)


def as_of_view(a) -> TextView:
    """get KEY --at TIME (a timetravel.AsOf)."""
    v = a.version
    rec = {"op": "get", "key": a.key, "at": iso(a.when), "found": v is not None,
           "version": v.version if v else 0, "value": v.value if v else None,
           "written_at": iso(v.written_at) if v else None}
    if v is None:
        text = Text.assemble(("(not found) ", "yellow"), (a.key, "bold"),
                             (f" — no live version written by {when_text(a.when)}", "dim"))
        line = fields(a.key, "(not found)")
    else:
        text = Text.assemble(
            (a.key, "bold"), " = ", (repr_value(v.value), "green"), "  ",
            (f"(version {v.version}, written {when_text(v.written_at)}, live at "
             f"{when_text(a.when)})", "cyan"))
        line = fields(a.key, v.version, v.value)
    return TextView(records=[rec], text=text, plain=[line])


# ---------------------------------------------------------------------------
# listings
# ---------------------------------------------------------------------------
def snapshot_view(rows, version: int, details: dict) -> TableView:
    """Every key at ``version`` (0: latest); ``details``: key -> VersionInfo (node, time)."""
    def detail(key):
        d = details.get(key)
        return [d.node if d else "", when_text(d.written_at) if d else ""] if details else []

    def record(r) -> dict:
        d = details.get(r.key)
        return _drop_none({"key": r.key, "version": r.version, "value": r.value,
                           "node": d.node if d else None,
                           "written_at": iso(d.written_at) if d else None})

    return TableView(
        title=f"snapshot at version ≤ {version}" if version else "snapshot (latest)",
        columns=[Column("key"), Column("version", "right"), Column("value"),
                 Column("size", "right"),
                 *([Column("node"), Column("written")] if details else [])],
        rows=[(r.key, r.version, elide(r.value), size_text(r.value), *detail(r.key))
              for r in rows],
        lines=[(r.key, r.version, r.value) for r in rows],
        records=[record(r) for r in rows], noun="key")


def history_view(h) -> TableView:
    """The live versions of a key, newest first (a client.History, ``more``: older remain)."""
    more = bool(getattr(h, "more", False))
    n = len(h.versions)
    caption = (plural(n, "live version") + (" shown (older ones remain)" if more else "")
               + f", highest ever {h.max_version}" if h.max_version else "key never written")
    return TableView(
        title=f"history of {h.key}", caption=caption, noun="version",
        columns=[Column("version", "right"), Column("value"), Column("size", "right"),
                 Column("node"), Column("written"), Column("seq", "right")],
        rows=[(v.version, elide(v.value), size_text(v.value), v.node, when_text(v.written_at),
               v.seq) for v in h.versions],
        lines=[(v.version, v.value, v.node, iso(v.written_at)) for v in h.versions],
        records=[{"key": h.key, "max_version": h.max_version, "more": more,
                  "versions": [{"version": v.version, "value": v.value, "node": v.node,
                                "written_at": iso(v.written_at), "seq": v.seq}
                               for v in h.versions]}])


_DIFF_STYLE = (("+++", "bold"), ("---", "bold"), ("@@", "cyan"), ("+", "green"), ("-", "red"))


def diff_text(lines: Sequence[str]) -> Text:
    """A unified diff coloured line by line (headers bold, hunks cyan, + green, - red)."""
    out = Text()
    for line in lines:
        style = next((st for head, st in _DIFF_STYLE if line.startswith(head)), "")
        out.append(line + "\n", style=style)
    out.rstrip()
    return out


def diff_view(d) -> TextView:
    """A timetravel.Diff: plain mode writes the unified diff as it is, like ``diff -u``."""
    text = (Text(f"{d.key}: versions {d.old.version} and {d.new.version} have the same value",
                 style="dim") if d.identical else diff_text(d.lines))
    return TextView(text=text, plain=list(d.lines),
                    records=[{"key": d.key, "from": d.old.version, "to": d.new.version,
                              "identical": d.identical, "json": d.as_json, "lines": d.lines}])


def keys_view(prefix: str, keys: Sequence[str]) -> TableView:
    return TableView(columns=[Column("key")], rows=[(k,) for k in keys], header=False,
                     frame="bare", caption=f"({plural(len(keys), 'key')})", noun="key",
                     records=[{"prefix": prefix, "keys": list(keys)}])


# ---------------------------------------------------------------------------
# cluster: status, members, identity
# ---------------------------------------------------------------------------
_ROLE_STYLE = {"leader": "bold green", "candidate": "yellow", "pre-candidate": "yellow",
               "learner": "cyan"}
_STATE_STYLE = {"in-step": "green", "no-quorum": "red", "removed": "red"}


def _styled(text: str, styles: dict, default: str = "yellow") -> Text:
    return Text(text, style=styles.get(text, default))


def status_view(nodes) -> StackView:
    """Every server (a table), why the down ones are down, and the members each one knows."""
    down = [Text.assemble((f"{n.node_id or n.address} down: ", "red"), n.error)
            for n in nodes if not n.up]
    return StackView(
        parts=[status_table(nodes),
               *([TextView(text=Text("\n").join(down))] if down else []),
               *([membership_table(nodes)] if any(n.up and n.members for n in nodes) else [])],
        records=[status_record(n) for n in nodes])


def status_record(n) -> dict:
    d = asdict(n) if is_dataclass(n) else dict(n)
    d["lag"] = n.lag
    return d


def status_fields(n) -> tuple:
    if not n.up:
        return n.address, "down", n.node_id, n.error
    return (n.address, "up", n.node_id, n.state, n.applied_seq, n.lag, n.keys, n.role or "-",
            n.term, n.commit_index, n.applied_index,
            ",".join(m.node_id for m in n.members) or "-")


def status_table(nodes) -> TableView:
    """One row per server: Raft role, term, indexes, state, keys.  The leader and the
    broker get a column only when the servers disagree / one is disconnected (width)."""
    up = [n for n in nodes if n.up]
    leaders = {n.leader for n in up}
    split_view = len(leaders) > 1
    broker_trouble = any(not n.broker_connected for n in up)
    # a server is named by its node id (its address is in `member list` and in JSON)
    columns = [Column("node", no_wrap=True)] + [
        Column(name, just, no_wrap=True, min_width=len(name))
        for name, just in (("role", "left"), ("term", "right"), ("commit", "right"),
                           ("applied", "right"), ("lag", "right"), ("state", "left"),
                           ("keys", "right"),
                           *((("leader", "left"),) if split_view else ()),
                           *((("broker", "left"),) if broker_trouble else ()))]
    rows = []
    for n in nodes:
        cells: list[Cell] = [n.node_id or n.address]
        if not n.up:
            cells += ["", "", "", "", "", Text("down", "red"), ""]
        else:
            raft = n.raft
            cells += [_styled(n.role, _ROLE_STYLE, default="") if raft else "-",
                      n.term if raft else "-", n.commit_index if raft else "-",
                      n.applied_index if raft else n.applied_seq, n.lag,
                      _styled(n.state, _STATE_STYLE), n.keys]
        if split_view:
            cells.append(n.leader if n.up else "")
        if broker_trouble:
            cells.append("" if not n.up else "ok" if n.broker_connected else Text("lost", "red"))
        rows.append(cells)
    notes = []
    if not split_view and up:
        notes.append(Text(f"leader {leaders.pop() or 'unknown'}"))
    ids = sorted({n.cluster_id for n in up if n.cluster_id})
    if len(ids) == 1:
        notes.append(Text(f"cluster {ids[0]}"))
    elif ids:
        notes.append(Text(f"servers report different clusters: {', '.join(ids)}", "red"))
    # no vertical rules: up to 11 columns have to fit a 100-column terminal
    return TableView(title="cluster status", columns=columns, rows=rows, frame="rules",
                     caption=Text(", ").join(notes), lines=[status_fields(n) for n in nodes],
                     noun="server")


def membership_table(nodes) -> TableView:
    """The configuration each server knows: one row per server, one column per member
    (a disagreement between rows is a configuration change in flight, or a split).
    Table mode only: plain and JSON carry the members in each server's line."""
    views = [n for n in nodes if n.up and n.members]
    member_ids = sorted({m.node_id for n in views for m in n.members})

    def cell(m) -> Text:
        if m is None:
            return Text("—", "dim")
        parts = [Text(m.role or "member")]
        if m.leader:
            parts.append(Text("leader", "bold green"))
        if not m.online:
            parts.append(Text("offline", "red"))
        if m.match_index:
            parts.append(Text(f"match {m.match_index}"))
        return Text(", ").join(parts)

    def row(n) -> list[Cell]:
        known = {m.node_id: m for m in n.members}
        return [n.node_id or n.address, *(cell(known.get(mid)) for mid in member_ids)]

    return TableView(
        title="members as each server sees them", frame="rules", lines=[], records=[],
        columns=[Column("server"), *(Column(mid) for mid in member_ids)],
        rows=[row(n) for n in views])


def member_row(m) -> dict:
    """One member as JSON."""
    return {"node_id": m.node_id, "address": m.address, "role": m.role, "online": m.online,
            "match_index": m.match_index, "leader": m.leader}


def members_view(members, caption: str) -> TableView:
    return TableView(
        title="members", caption=caption, noun="member",
        columns=[Column("node"), Column("address"), Column("role"), Column("online"),
                 Column("match", "right"), Column("leader")],
        rows=[(m.node_id, m.address, Text(m.role, "cyan" if m.role == "learner" else ""),
               Text("yes", "green") if m.online else Text("no", "red"),
               m.match_index or "-", Text("★ leader", "bold green") if m.leader else "")
              for m in members],
        lines=[(m.node_id, m.address or "-", m.role or "-",
                "online" if m.online else "offline", m.match_index,
                "leader" if m.leader else "-") for m in members],
        records=[member_row(m) for m in members])


def member_list_view(ml) -> TableView:
    caption = plural(len(ml.members), "member")
    caption += f", leader {ml.leader}" if ml.leader else ", no leader known"
    caption += f", cluster {ml.cluster_id}" if ml.cluster_id else ""
    return members_view(ml.members, caption)


def member_removed_view(r, error: str = "") -> View:
    """member remove: the new list (a client.MemberRemoval)."""
    rec = _drop_none({"op": "member remove", "node": r.node_id, "ok": r.ok,
                      "error": r.error or None,
                      "members": [member_row(m) for m in r.members] if not error else None})
    if error:
        return View(records=[rec], error=error)
    return StackView(
        parts=[TextView(text=_ok("removed ", (r.node_id, "bold"), " from the cluster")),
               members_view(r.members, f"{plural(len(r.members), 'member')} now")],
        records=[rec])


def prefixes_text(prefixes, admin: bool) -> str:
    """Key prefixes for people: "" is every key."""
    if admin:
        return "every key (admin)"
    if "" in prefixes:
        return "every key"
    return ", ".join(repr(p) for p in prefixes) or "none"


def whoami_view(ident, connection: str) -> TableView:
    """Who the server takes the shell for (a client.Identity); ``connection``: TLS or not."""
    rows = [("name", ident.name or "anonymous"),
            ("roles", ", ".join(ident.roles) or "none"),
            ("method", ident.method or "none"),
            ("read", prefixes_text(ident.read_prefixes, ident.admin)),
            ("write", prefixes_text(ident.write_prefixes, ident.admin)),
            ("tls", "yes" if ident.tls else "no"),
            ("connection", Text(connection,
                                "green" if connection.startswith("TLS") else "bold red")),
            ("server", ident.server or "-")]
    return TableView(
        title="whoami", header=False, columns=[Column("field", style="bold"), Column("value")],
        rows=rows,
        records=[{"name": ident.name, "roles": ident.roles, "method": ident.method,
                  "admin": ident.admin, "read_prefixes": ident.read_prefixes,
                  "write_prefixes": ident.write_prefixes, "tls": ident.tls,
                  "connection": connection, "server": ident.server}])


# ---------------------------------------------------------------------------
# watch, export / import, retention
# ---------------------------------------------------------------------------
# table mode prints each change as it comes, so every row is a line of fixed widths
# (one rich table per change would size its columns anew every time)
# (the value preview comes last: a narrow terminal cuts it off rather than wrap the row)
WATCH_COLUMNS = (("position", 8, "right"), ("time", 8, "left"), ("op", 4, "left"),
                 ("key", 24, "left"), ("version", 7, "right"), ("node", 10, "left"),
                 ("value", 0, "left"))


def _watch_line(cells: Sequence[tuple[str, str]]) -> RenderableType:
    out = Text(no_wrap=True, overflow="ellipsis")
    for i, ((text, style), (_name, width, justify)) in enumerate(zip(cells, WATCH_COLUMNS)):
        if i:
            out.append("  ")
        pad = max(0, width - len(text))
        out.append(" " * pad if justify == "right" else "")
        out.append(text, style=style)
        out.append(" " * pad if justify == "left" and i < len(WATCH_COLUMNS) - 1 else "")
    out.rstrip()
    return Group(out)  # printed as is (console.print would join a bare Text anew, wrapping it)


def watch_header_view() -> TextView:
    """The column names of a watch, in table mode only."""
    return TextView(text=_watch_line([(name, "bold") for name, _w, _j in WATCH_COLUMNS]),
                    plain=[], records=[])


def change_record(c) -> dict:
    """One change (a client.Change) as JSON: what ``watch`` prints per line when piped."""
    return {"position": c.position, "op": c.op, "key": c.key, "version": c.version,
            "value": c.value if c.op == "put" else None, "node": c.node,
            "written_at": iso(c.written_at) or None, "all_versions": c.all_versions}


def change_view(c) -> TextView:
    """One change: a row in table mode; one JSON object per line in plain and JSON mode
    (a watch's output is meant for programs, like ``etcdctl watch -w json``)."""
    rec = change_record(c)
    when = _dt.datetime.fromtimestamp(c.written_at).strftime("%H:%M:%S") if c.written_at else ""
    if c.op == "put":
        op, value = ("put", "green"), (elide(c.value, 40), "")
    else:
        op = ("del*" if c.all_versions else "del", "red")
        value = ("(every version)" if c.all_versions else "", "dim")
    text = _watch_line([(str(c.position), "dim"), (when, "dim"), op, (elide(c.key, 40), "bold"),
                        (str(c.version), "cyan"), (c.node, "dim"), value])
    return TextView(text=text, plain=[json.dumps(rec, ensure_ascii=False)], records=[rec])


def export_view(s) -> TextView:
    """The summary of an export (a transfer.ExportSummary)."""
    rec = {"op": "export", "path": s.path, "prefix": s.prefix, "position": s.position,
           "keys": s.keys, "versions": s.versions, "bytes": s.bytes}
    where = f"keys starting with {s.prefix!r}" if s.prefix else "every key"
    text = Text.assemble(
        _ok("exported ", (plural(s.keys, "key"), "bold"), f" ({plural(s.versions, 'version')}, ",
            bytes_text(s.bytes), ") to ", (s.path, "bold")),
        ("\n" + f"{where}, as of position {s.position}", "dim"))
    return TextView(text=text, records=[rec],
                    plain=[fields(s.path, s.position, s.keys, s.versions, s.bytes)])


def import_record(s) -> dict:
    return {"op": "import", "path": s.path, "position": s.position, "prefix": s.prefix,
            "keys": s.keys, "versions": s.versions, "total": s.total, "batches": s.batches,
            "placeholders": s.placeholders, "renumbered": s.renumbered,
            "renumbered_keys": list(s.renumbered_keys), "unfilled": s.unfilled,
            "unfilled_keys": list(s.unfilled_keys), "line": s.line, "complete": s.complete,
            "skipped": s.skipped}


def _some(keys: Sequence[str], n: int) -> str:
    shown = ", ".join(keys)
    return shown + (f" and {n - len(keys)} more" if n > len(keys) else "")


def import_view(s, error: str = "") -> View:
    """The summary of an import (a transfer.ImportSummary); with ``error``: how far a
    failed one got (records only: the shell prints the error)."""
    rec = import_record(s)
    if error:
        return View(records=[rec], error=error)
    rows: list[tuple[str, Cell]] = [
        ("file", s.path), ("exported at", f"position {s.position}"
                           + (f", prefix {s.prefix!r}" if s.prefix else "")),
        ("keys", s.keys), ("versions", f"{s.versions} of {s.total}"
                           + (f" ({s.skipped} already here: not written again)"
                              if s.skipped else "")), ("batches", s.batches),
        ("placeholders", f"{s.placeholders} (gaps filled, then removed)"
         if s.placeholders else 0),
        ("renumbered", Text(f"{s.renumbered} keys: " + _some(s.renumbered_keys, s.renumbered)
                            + " (they had versions here already)", "yellow")
         if s.renumbered else 0)]
    if s.unfilled:
        rows.append(("unfilled", Text(f"{s.unfilled} keys: " + _some(s.unfilled_keys, s.unfilled)
                                      + " (too many gaps: versions renumbered)", "yellow")))
    return TableView(
        title="import complete" if s.complete else "import (incomplete)", header=False,
        columns=[Column("field", style="bold"), Column("value")], rows=rows,
        lines=[(s.path, s.keys, s.versions, s.batches, s.placeholders, s.renumbered,
                s.unfilled)], records=[rec])


def retention_record(info, op: str) -> dict:
    return {"op": op, "keep_versions": info.keep_versions, "compacted": info.compacted,
            "position": info.position, "oldest_watch": info.oldest_watch,
            "dropped": info.dropped}


def retention_view(info, op: str = "retention", note: Text | str = "") -> TableView:
    """retention / compact: the policy and what the answering server keeps (a
    client.RetentionInfo); ``note``: what the change did (its caption)."""
    rows = [("keep versions", f"{info.keep_versions} per key" if info.keep_versions
             else "all (0: no limit)"),
            ("compacted at", f"position {info.compacted}" if info.compacted else "never"),
            ("position", f"{info.position} (last applied)"),
            ("oldest watch", f"position {info.oldest_watch} (the oldest a watch can start at)")]
    if op != "retention" or info.dropped:
        rows.append(("dropped", plural(info.dropped, "version")))
    return TableView(
        title=op, header=False, columns=[Column("field", style="bold"), Column("value")],
        rows=rows, caption=note,
        lines=[(info.keep_versions, info.compacted, info.position, info.oldest_watch,
                info.dropped)], records=[retention_record(info, op)])


# ---------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------
HELP_HINT = ("help COMMAND shows an example; TAB completes commands, keys and versions; "
             "`;` separates commands; # starts a comment.")


def help_view(cmds: Iterable, detail: bool) -> View:
    """The command list, or one command explained (``cmds``: commands.Command)."""
    cmds = list(cmds)
    records = [{"commands": [{"name": c.name, "aliases": list(c.aliases), "syntax": c.syntax,
                              "summary": c.summary, "meaning": c.meaning,
                              "example": c.example} for c in cmds]}]
    if detail:
        c = cmds[0]
        aliases = ", ".join(c.aliases)
        text = Group(Text(c.syntax, style="bold"), Text(c.meaning),
                     Text.assemble(("example: ", "dim"), (c.example, "cyan")),
                     *([Text.assemble(("aliases: ", "dim"), aliases)] if aliases else []))
        plain = [c.syntax, c.meaning, f"example: {c.example}",
                 *([f"aliases: {aliases}"] if aliases else [])]
        return TextView(text=text, plain=plain, records=records)
    table = TableView(
        columns=[Column("command"), Column("meaning"), Column("aliases", style="dim")],
        rows=[(c.syntax, c.summary, ", ".join(c.aliases)) for c in cmds],
        lines=[(c.syntax, c.summary) for c in cmds], frame="bare", noun="command")
    return StackView(parts=[table, TextView(text=Text(HELP_HINT, style="dim"))],
                     records=records)
