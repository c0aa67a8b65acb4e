"""Output: rich tables (``table``), tab-separated lines (``plain``) or JSON lines (``json``).

- ``table``: for people at a terminal; coloured when stdout is a TTY.
- ``plain``: one result per line, fields separated by a TAB, no header; backslash,
  TAB, CR and newline inside values are written ``\\\\`` ``\\t`` ``\\r`` ``\\n`` so a
  record is always exactly one line.
- ``json``: one JSON object per line (JSON Lines); batch commands, ``snapshot``
  and ``status`` write one object per item.

Results go to stdout, errors (and, outside the interactive shell, information
messages and timing) to stderr.
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
from dataclasses import asdict, is_dataclass
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .commands import Command, Outcome

FORMATS = ("table", "plain", "json")
PREVIEW = 48  # characters of a value shown in tables
TABLE_ROWS = 1000  # rows shown in a table before "... N more"


def elide(value: str, width: int = PREVIEW) -> str:
    one_line = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if len(one_line) <= width:
        return one_line
    return one_line[: width - 1] + "…"


def size_text(value: str) -> str:
    n = len(value.encode("utf-8"))
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def when_text(ts: float) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def esc_plain(value: str) -> str:
    return (value.replace("\\", "\\\\").replace("\t", "\\t")
            .replace("\r", "\\r").replace("\n", "\\n"))


def _iso(ts: float) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


class Renderer:
    def __init__(self, fmt: str = "table", out: TextIO | None = None, err: TextIO | None = None,
                 color: bool | None = None, interactive: bool = False, width: int | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.fmt = fmt
        self.out_file = out or sys.stdout
        self.err_file = err or sys.stderr
        self.interactive = interactive
        color = self.out_file.isatty() if color is None else color
        self.out = Console(file=self.out_file, force_terminal=color, no_color=not color,
                           highlight=False, soft_wrap=False, width=width,
                           color_system="auto" if color else None)
        ecolor = color and self.err_file.isatty()
        self.err = Console(file=self.err_file, force_terminal=ecolor, no_color=not ecolor,
                           highlight=False, color_system="auto" if ecolor else None, width=width)

    # -- low level -------------------------------------------------------------
    def _line(self, *fields: Any) -> None:
        self.out_file.write("\t".join(esc_plain(str(f)) for f in fields) + "\n")

    def _json(self, obj: Any) -> None:
        self.out_file.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        for f in (self.out_file, self.err_file):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass

    def error(self, message: str) -> None:
        if self.err.is_terminal:
            self.err.print(Text("error: ", style="bold red") + Text(message))
        else:
            self.err_file.write(f"error: {message}\n")
        self.flush()

    def info(self, message: str) -> None:
        """Information (connect, timing...): stdout when interactive, else stderr."""
        if self.interactive:
            self.out.print(Text(message, style="cyan"))
        else:
            self.err_file.write(message + "\n")

    def timing(self, seconds: float, peer: str = "") -> None:
        msg = f"({seconds * 1000:.1f} ms" + (f" via {peer})" if peer else ")")
        if self.interactive:
            self.out.print(Text(msg, style="dim"))
        else:
            self.err_file.write(msg + "\n")

    # -- dispatch --------------------------------------------------------------
    def render(self, outcome: Outcome) -> None:
        fn = getattr(self, f"_r_{outcome.kind}", None)
        if fn is not None:
            fn(outcome)
        self.flush()

    def _r_none(self, o: Outcome) -> None:
        pass

    def _r_info(self, o: Outcome) -> None:
        self.info(str(o.data))

    # -- single-key commands ---------------------------------------------------
    def _r_put(self, o: Outcome) -> None:
        r = o.data
        if self.fmt == "json":
            self._json(_drop_none({"op": "put", "key": r.key, "version": r.version, "ok": r.ok,
                                   "error": r.error or None}))
        elif not r.ok:
            return  # the error goes to stderr
        elif self.fmt == "plain":
            self._line(r.key, r.version)
        else:
            self.out.print(Text.assemble(("OK ", "bold green"), (r.key, "bold"),
                                         " → version ", (str(r.version), "bold cyan")))

    def _r_del(self, o: Outcome) -> None:
        r = o.data
        if self.fmt == "json":
            self._json(_drop_none({"op": "del", "key": r.key, "requested": r.requested,
                                   "version": r.version, "ok": r.ok, "error": r.error or None}))
        elif not r.ok:
            return
        elif self.fmt == "plain":
            self._line(r.key, r.version)
        else:
            what = (f"version {r.version}" if r.requested is not None
                    else f"every version (highest {r.version})")
            self.out.print(Text.assemble(("OK ", "bold green"), "removed ", (r.key, "bold"),
                                         " ", what))

    def _get_json(self, r) -> dict:
        return _drop_none({"op": "get", "key": r.key, "requested": r.requested,
                           "version": r.version, "value": r.value if r.found else None,
                           "found": r.found, "error": r.error or None})

    def _get_plain(self, r) -> None:
        if r.found:
            self._line(r.key, r.version, r.value)
        else:
            self._line(r.key if r.requested is None else f"{r.key}@{r.requested}",
                       NOT_SERVED if r.error else "(not found)")

    def _r_get(self, o: Outcome) -> None:
        r = o.data
        if self.fmt == "json":
            self._json(self._get_json(r))
        elif not o.ok:
            return  # not served: the error goes to stderr
        elif self.fmt == "plain":
            self._get_plain(r)
        else:
            self.out.print(self._get_text(r))

    def _get_text(self, r) -> Text:
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

    # -- batches -----------------------------------------------------------------
    def _r_mput(self, o: Outcome) -> None:
        self._written_rows("mput", o.data)

    def _r_mdel(self, o: Outcome) -> None:
        self._written_rows("mdel", o.data)

    def _written_rows(self, op: str, rows) -> None:
        if self.fmt == "json":
            for r in rows:
                self._json(_drop_none({"op": op, "key": r.key, "requested": r.requested,
                                       "version": r.version, "ok": r.ok,
                                       "error": r.error or None}))
        elif self.fmt == "plain":
            for r in rows:
                self._line(r.key, r.version)
        else:
            t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
            t.add_column("key")
            if op == "mdel":
                t.add_column("asked", justify="right")
            t.add_column("version", justify="right")
            t.add_column("result")
            for r in rows:
                cells = [escape(r.key)]
                if op == "mdel":
                    cells.append("all" if r.requested is None else str(r.requested))
                cells.append(str(r.version))
                cells.append("[green]ok[/]" if r.ok else f"[red]refused[/] {escape(r.error)}")
                t.add_row(*cells)
            self.out.print(t)

    def _r_mget(self, o: Outcome) -> None:
        if self.fmt == "json":
            for r in o.data:
                self._json(self._get_json(r))
        elif self.fmt == "plain":
            for r in o.data:
                self._get_plain(r)
        else:
            t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
            for col, just in (("key", "left"), ("asked", "right"), ("version", "right"),
                              ("value", "left")):
                t.add_column(col, justify=just)
            for r in o.data:
                t.add_row(escape(r.key), "" if r.requested is None else str(r.requested),
                          str(r.version) if r.found else "-",
                          escape(elide(r.value)) if r.found
                          else f"[red]{NOT_SERVED}[/] {escape(r.error)}" if r.error
                          else "[yellow](not found)[/]")
            self.out.print(t)

    # -- listings ------------------------------------------------------------------
    def _r_snapshot(self, o: Outcome) -> None:
        if not o.ok:
            return  # not served: the error goes to stderr
        rows = o.data
        details = o.extra.get("details", {})
        if self.fmt == "json":
            for r in rows:
                d = details.get(r.key)
                self._json(_drop_none({"key": r.key, "version": r.version, "value": r.value,
                                       "node": d.node if d else None,
                                       "written_at": _iso(d.written_at) if d else None}))
        elif self.fmt == "plain":
            for r in rows:
                self._line(r.key, r.version, r.value)
        else:
            ver = o.extra.get("version") or 0
            title = f"snapshot at version ≤ {ver}" if ver else "snapshot (latest)"
            t = Table(title=title, title_justify="left", header_style="bold")
            t.add_column("key")
            t.add_column("version", justify="right")
            t.add_column("value")
            t.add_column("size", justify="right")
            if details:
                t.add_column("node")
                t.add_column("written")
            for r in rows[:TABLE_ROWS]:
                cells = [escape(r.key), str(r.version), escape(elide(r.value)), size_text(r.value)]
                if details:
                    d = details.get(r.key)
                    cells += [escape(d.node) if d else "", when_text(d.written_at) if d else ""]
                t.add_row(*cells)
            t.caption = _more(len(rows), "key")
            self.out.print(t)

    def _r_history(self, o: Outcome) -> None:
        h = o.data
        more = bool(getattr(h, "more", False))
        if self.fmt == "json":
            self._json({"key": h.key, "max_version": h.max_version, "more": more,
                        "versions": [{"version": v.version, "value": v.value, "node": v.node,
                                      "written_at": _iso(v.written_at), "seq": v.seq}
                                     for v in h.versions]})
        elif self.fmt == "plain":
            for v in h.versions:
                self._line(v.version, v.value, v.node, _iso(v.written_at))
        else:
            t = Table(title=f"history of {escape(h.key)}", title_justify="left",
                      header_style="bold")
            t.add_column("version", justify="right")
            t.add_column("value")
            t.add_column("size", justify="right")
            t.add_column("node")
            t.add_column("written")
            t.add_column("seq", justify="right")
            for v in h.versions[:TABLE_ROWS]:
                t.add_row(str(v.version), escape(elide(v.value)), size_text(v.value),
                          escape(v.node), when_text(v.written_at), str(v.seq))
            n = len(h.versions)
            t.caption = (f"{n} live version{'s' if n != 1 else ''}"
                         + (" shown (older ones remain)" if more else "")
                         + f", highest ever {h.max_version}"
                         if h.max_version else "key never written")
            self.out.print(t)

    def _r_get_at(self, o: Outcome) -> None:
        a = o.data
        v = a.version
        if self.fmt == "json":
            self._json({"op": "get", "key": a.key, "at": _iso(a.when), "found": v is not None,
                        "version": v.version if v else 0, "value": v.value if v else None,
                        "written_at": _iso(v.written_at) if v else None})
        elif self.fmt == "plain":
            if v is None:
                self._line(a.key, "(not found)")
            else:
                self._line(a.key, v.version, v.value)
        elif v is None:
            self.out.print(Text.assemble(("(not found) ", "yellow"), (a.key, "bold"),
                                         (f" — no live version written by {when_text(a.when)}",
                                          "dim")))
        else:
            self.out.print(Text.assemble(
                (a.key, "bold"), " = ", (repr_value(v.value), "green"), "  ",
                (f"(version {v.version}, written {when_text(v.written_at)}, live at "
                 f"{when_text(a.when)})", "cyan")))

    def _r_diff(self, o: Outcome) -> None:
        d = o.data
        if d is None:
            return  # a missing version: the error goes to stderr
        if self.fmt == "json":
            self._json({"key": d.key, "from": d.old.version, "to": d.new.version,
                        "identical": d.identical, "json": d.as_json, "lines": d.lines})
        elif self.fmt == "plain":
            for line in d.lines:  # like diff -u: a line of the values is a line here
                self.out_file.write(line + "\n")
        elif d.identical:
            self.out.print(Text(f"{d.key}: versions {d.old.version} and {d.new.version} "
                                "have the same value", style="dim"))
        else:
            self.out.print(diff_text(d.lines))

    def _r_keys(self, o: Outcome) -> None:
        keys = o.data
        if self.fmt == "json":
            self._json({"prefix": o.extra.get("prefix", ""), "keys": keys})
        elif self.fmt == "plain":
            for k in keys:
                self._line(k)
        else:
            for k in keys[:TABLE_ROWS]:
                self.out.print(Text(k))
            more = _more(len(keys), "key")
            self.out.print(Text(more or f"({len(keys)} key{'s' if len(keys) != 1 else ''})",
                                style="dim"))

    def _r_status(self, o: Outcome) -> None:
        nodes = o.data
        if self.fmt == "json":
            for n in nodes:
                d = asdict(n) if is_dataclass(n) else dict(n)
                d["lag"] = n.lag
                self._json(d)
        elif self.fmt == "plain":
            for n in nodes:
                if n.up:
                    self._line(n.address, "up", n.node_id, n.state, n.applied_seq, n.lag, n.keys,
                               n.role or "-", n.term, n.commit_index, n.applied_index,
                               ",".join(m.node_id for m in n.members) or "-")
                else:
                    self._line(n.address, "down", n.node_id, n.error)
        else:
            self.out.print(status_table(nodes))
            for n in nodes:  # reasons are long: below the table, not in a cell
                if not n.up:
                    self.out.print(Text.assemble((f"{n.node_id or n.address} down: ", "red"),
                                                 n.error))
            views = membership_table(nodes)
            if views is not None:
                self.out.print(views)

    # -- identity ---------------------------------------------------------------------
    def _r_whoami(self, o: Outcome) -> None:
        rows = whoami_rows(o.data, o.extra.get("security", ""))
        if self.fmt == "json":
            self._json({"name": o.data.name, "roles": o.data.roles, "method": o.data.method,
                        "admin": o.data.admin, "read_prefixes": o.data.read_prefixes,
                        "write_prefixes": o.data.write_prefixes, "tls": o.data.tls,
                        "connection": o.extra.get("security", ""), "server": o.data.server})
        elif self.fmt == "plain":
            for k, v in rows:
                self._line(k, v)
        else:
            t = Table(title="whoami", title_justify="left", show_header=False)
            t.add_column(style="bold")
            t.add_column()
            for k, v in rows:
                style = ("green" if v.startswith("TLS") else "bold red") if k == "connection" else ""
                t.add_row(k, Text(v, style=style))
            self.out.print(t)

    # -- membership -----------------------------------------------------------------
    def _r_members(self, o: Outcome) -> None:
        ml = o.data
        caption = f"{len(ml.members)} member{'s' if len(ml.members) != 1 else ''}"
        caption += f", leader {ml.leader}" if ml.leader else ", no leader known"
        caption += f", cluster {ml.cluster_id}" if ml.cluster_id else ""
        self._members(ml.members, caption)

    def _r_member_remove(self, o: Outcome) -> None:
        r = o.data
        if self.fmt == "json":
            self._json(_drop_none({"op": "member remove", "node": r.node_id, "ok": r.ok,
                                   "error": r.error or None,
                                   "members": [member_row(m) for m in r.members] if r.ok else None}))
        elif not r.ok:
            return  # the error goes to stderr
        else:
            if self.fmt == "table":
                self.out.print(Text.assemble(("OK ", "bold green"), "removed ",
                                             (r.node_id, "bold"), " from the cluster"))
            self._members(r.members, f"{len(r.members)} members now")

    def _members(self, members, caption: str) -> None:
        rows = [member_row(m) for m in members]
        if self.fmt == "json":
            for row in rows:
                self._json(row)
        elif self.fmt == "plain":
            for m in rows:
                self._line(m["node_id"], m["address"] or "-", m["role"] or "-",
                           "online" if m["online"] else "offline", m["match_index"],
                           "leader" if m["leader"] else "-")
        else:
            t = Table(title="members", title_justify="left", header_style="bold", caption=caption)
            for col, just in (("node", "left"), ("address", "left"), ("role", "left"),
                              ("online", "left"), ("match", "right"), ("leader", "left")):
                t.add_column(col, justify=just)
            for m in rows:
                t.add_row(escape(m["node_id"]), escape(m["address"]),
                          f"[cyan]{escape(m['role'])}[/]" if m["role"] == "learner"
                          else escape(m["role"]),
                          "[green]yes[/]" if m["online"] else "[red]no[/]",
                          str(m["match_index"]) if m["match_index"] else "-",
                          "[bold green]★ leader[/]" if m["leader"] else "")
            self.out.print(t)

    def _r_help(self, o: Outcome) -> None:
        cmds: list[Command] = o.data
        if self.fmt == "json":
            self._json({"commands": [{"name": c.name, "aliases": list(c.aliases),
                                      "syntax": c.syntax, "summary": c.summary,
                                      "meaning": c.meaning, "example": c.example}
                                     for c in cmds]})
            return
        if o.extra.get("detail"):
            c = cmds[0]
            if self.fmt == "plain":
                self.out_file.write(f"{c.syntax}\n{c.meaning}\nexample: {c.example}\n")
                if c.aliases:
                    self.out_file.write(f"aliases: {', '.join(c.aliases)}\n")
                return
            self.out.print(Text(c.syntax, style="bold"))
            self.out.print(c.meaning, markup=False)
            self.out.print(Text.assemble(("example: ", "dim"), (c.example, "cyan")))
            if c.aliases:
                self.out.print(Text.assemble(("aliases: ", "dim"), ", ".join(c.aliases)))
            return
        if self.fmt == "plain":
            for c in cmds:
                self._line(c.syntax, c.summary)
            return
        t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
        t.add_column("command")
        t.add_column("meaning")
        t.add_column("aliases", style="dim")
        for c in cmds:
            t.add_row(escape(c.syntax), escape(c.summary), escape(", ".join(c.aliases)))
        self.out.print(t)
        self.out.print(Text("help COMMAND shows an example; TAB completes commands, keys and "
                            "versions; `;` separates commands; # starts a comment.", style="dim"))


_DIFF_STYLE = (("+++", "bold"), ("---", "bold"), ("@@", "cyan"), ("+", "green"), ("-", "red"))


def diff_text(lines: list[str]) -> Text:
    """A unified diff coloured line by line (headers bold, hunks cyan, + green, - red)."""
    out = Text()
    for line in lines:
        style = next((st for head, st in _DIFF_STYLE if line.startswith(head)), "")
        out.append(line + "\n", style=style)
    out.rstrip()
    return out


NOT_SERVED = "(not served)"
_ROLE_STYLE = {"leader": "bold green", "candidate": "yellow", "pre-candidate": "yellow",
               "learner": "cyan"}
_STATE_STYLE = {"in-step": "green", "no-quorum": "red", "removed": "red"}


def prefixes_text(prefixes, admin: bool) -> str:
    """Key prefixes for people: "" is every key."""
    if admin:
        return "every key (admin)"
    if "" in prefixes:
        return "every key"
    return ", ".join(repr(p) for p in prefixes) or "none"


def whoami_rows(ident, connection: str) -> list[tuple[str, str]]:
    return [("name", ident.name or "anonymous"),
            ("roles", ", ".join(ident.roles) or "none"),
            ("method", ident.method or "none"),
            ("read", prefixes_text(ident.read_prefixes, ident.admin)),
            ("write", prefixes_text(ident.write_prefixes, ident.admin)),
            ("tls", "yes" if ident.tls else "no"),
            ("connection", connection),
            ("server", ident.server or "-")]


def member_row(m) -> dict:
    """One member as the three formats show it (the JSON object)."""
    return {"node_id": m.node_id, "address": m.address, "role": m.role, "online": m.online,
            "match_index": m.match_index, "leader": m.leader}


def _styled(text: str, styles: dict, default: str = "yellow") -> str:
    style = styles.get(text, default)
    return f"[{style}]{escape(text)}[/]" if text and style else escape(text)


def status_table(nodes) -> Table:
    """One row per server: Raft role, term, indexes, state, keys.  The leader and the
    broker get a column only when the servers disagree / one is disconnected (width)."""
    up = [n for n in nodes if n.up]
    leaders = {n.leader for n in up}
    split_view = len(leaders) > 1
    broker_trouble = any(not n.broker_connected for n in up)
    # no vertical rules: up to 11 columns have to fit a 100-column terminal
    t = Table(title="cluster status", title_justify="left", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    # a server is named by its node id (its address is in `member list` and in JSON)
    t.add_column("node", no_wrap=True)
    for col, just in (("role", "left"), ("term", "right"),
                      ("commit", "right"), ("applied", "right"), ("lag", "right"),
                      ("state", "left"), ("keys", "right")):
        t.add_column(col, justify=just, no_wrap=True, min_width=len(col))
    if split_view:
        t.add_column("leader", no_wrap=True, min_width=len("leader"))
    if broker_trouble:
        t.add_column("broker", no_wrap=True, min_width=len("broker"))
    for n in nodes:
        cells = [escape(n.node_id or n.address)]
        if not n.up:
            cells += ["", "", "", "", "", "[red]down[/]", ""]
        else:
            raft = n.raft
            cells += [_styled(n.role, _ROLE_STYLE, default="") if raft else "-",
                      str(n.term) if raft else "-", str(n.commit_index) if raft else "-",
                      str(n.applied_index if raft else n.applied_seq), str(n.lag),
                      _styled(n.state, _STATE_STYLE), str(n.keys)]
        if split_view:
            cells.append(escape(n.leader) if n.up else "")
        if broker_trouble:
            cells.append("" if not n.up else "ok" if n.broker_connected else "[red]lost[/]")
        t.add_row(*cells)
    notes = []
    if not split_view and up:
        notes.append(f"leader {escape(leaders.pop() or 'unknown')}")
    ids = sorted({n.cluster_id for n in up if n.cluster_id})
    if len(ids) == 1:
        notes.append(f"cluster {escape(ids[0])}")
    elif ids:
        notes.append(f"[red]servers report different clusters: {escape(', '.join(ids))}[/]")
    t.caption = ", ".join(notes)
    return t


def membership_table(nodes) -> Table | None:
    """The configuration each server knows: one row per server, one column per member
    (a disagreement between rows is a configuration change in flight, or a split)."""
    views = [n for n in nodes if n.up and n.members]
    if not views:
        return None
    member_ids = sorted({m.node_id for n in views for m in n.members})
    t = Table(title="members as each server sees them", title_justify="left",
              header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("server")
    for mid in member_ids:
        t.add_column(escape(mid))
    for n in views:
        known = {m.node_id: m for m in n.members}
        cells = []
        for mid in member_ids:
            m = known.get(mid)
            if m is None:
                cells.append("[dim]—[/]")
                continue
            parts = [escape(m.role or "member")]
            if m.leader:
                parts.append("[bold green]leader[/]")
            if not m.online:
                parts.append("[red]offline[/]")
            if m.match_index:
                parts.append(f"match {m.match_index}")
            cells.append(", ".join(parts))
        t.add_row(escape(n.node_id or n.address), *cells)
    return t


def repr_value(value: str) -> str:
    return '"' + elide(value, 200).replace('"', '\\"') + '"'


def _more(n: int, noun: str) -> str:
    if n > TABLE_ROWS:
        return f"… {n - TABLE_ROWS} more {noun}s not shown (use --format plain or json)"
    return ""


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None or k in ("requested", "value")}
