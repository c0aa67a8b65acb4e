"""Completion of commands, keys and versions.

Keys come from the server (``KVSExt.ListKeys``, prefix + limit) into a
:class:`KeyIndex`: one sorted Python list answered with ``bisect``, so a
completion costs O(log n + shown) whatever the number of keys.  A prefix that
was listed completely (not truncated) makes the index authoritative for every
longer prefix, so typing more characters asks the server nothing.  The index is
pure (no I/O, threads or clock); a :class:`KeyRefresher` lists prefixes and
hands the pages to :class:`KVSCompleter`, which merges them under its lock
(like pgcli's completion_refresher).

Network calls never run on the UI thread: the shell wraps :class:`KVSCompleter`
in prompt_toolkit's ``ThreadedCompleter``, so the first completion of a new
prefix waits (at most ``fetch_timeout``) in the completion thread only, and
after a write the prefixes used lately are re-listed by the refresher's thread
(stale entries keep answering meanwhile).

Versions (for ``get KEY VER``, ``del KEY VER``, ``diff KEY V1 V2``, ``mget KEY@VER``) come from
``KVSExt.History`` of the key already typed, newest first, with a preview of
the value as completion meta; cached per key until that key is written.

Options (``--limit``, ``--since``, ``--at``, ``--from``) complete by name, their values with
hints (``5m ago``...).  Log positions (``compact POSITION``, ``watch --from POSITION``) come
from ``KVSExt.Retention`` (the current position, the oldest a watch can start at), cached
for a few seconds; ``retention N`` offers a few counts and the current one; a FILE
(``export``, ``import``) completes paths.  Node ids (``member remove NODE``) come from the last ``member list`` / ``status``
the shell ran; before any, from one ``KVSExt.MemberList`` in the completion thread.
"""
from __future__ import annotations

import bisect
import threading
import time
from typing import Callable, Iterable, Literal

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from . import commands as C
from .parser import current_command, quote

LIST_LIMIT = 200  # keys asked from the server per prefix
MAX_SHOWN = 100  # completions shown at once
PREVIEW = 30
RECENT = 4  # prefixes re-listed after a write

Freshness = Literal["fresh", "stale", "missing"]


def _next_prefix(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


class KeyIndex:
    """Live keys, sorted, and the prefixes listed so far.  Pure: no I/O, threads or clock;
    not thread-safe (its owner serializes access).

    Every listing is recorded with the *generation* it was asked at; a write moves the
    generation on (:meth:`invalidate`), so what was listed before it is stale: still
    answered, but due for a new listing.
    """

    def __init__(self) -> None:
        self._keys: list[str] = []
        # prefix -> (generation listed at, complete?); complete: the server listed all of them
        self._listed: dict[str, tuple[int, bool]] = {}
        self.generation = 0
        self._since = 0  # listings asked before this generation are dropped (clear)

    def lookup(self, prefix: str, limit: int = MAX_SHOWN) -> list[str]:
        """Known keys starting with ``prefix``, at most ``limit``."""
        lo = bisect.bisect_left(self._keys, prefix)
        out = []
        for k in self._keys[lo:lo + limit]:
            if not k.startswith(prefix):
                break
            out.append(k)
        return out

    def state(self, prefix: str) -> Freshness:
        """fresh: the index answers; stale: it answers, a listing is due; missing: never
        listed (neither the prefix nor a shorter one completely)."""
        best: Freshness = "missing"
        for p, (gen, complete) in self._listed.items():
            if p == prefix or (complete and prefix.startswith(p)):
                if gen == self.generation:
                    return "fresh"
                best = "stale"
        return best

    def complete(self, prefix: str, limit: int = MAX_SHOWN) -> tuple[list[str], Freshness]:
        """The keys to show for ``prefix`` and how fresh they are."""
        return self.lookup(prefix, limit), self.state(prefix)

    def merge(self, prefix: str, keys: Iterable[str], truncated: bool,
              generation: int | None = None) -> None:
        """A listing of ``prefix`` (asked at ``generation``) replaces what the index knew
        of that range: keys that are gone are dropped.  A truncated listing covers only
        the range up to its last key."""
        gen = self.generation if generation is None else generation
        if gen < self._since:
            return  # asked before a clear: of another cluster
        keys = sorted(keys)
        cur = self._keys
        lo = bisect.bisect_left(cur, prefix)
        if truncated and keys:
            hi = bisect.bisect_right(cur, keys[-1])
        else:
            nxt = _next_prefix(prefix)
            hi = len(cur) if nxt is None else bisect.bisect_left(cur, nxt)
        self._keys = cur[:lo] + keys + cur[hi:]
        self._listed[prefix] = (gen, not truncated)

    def add(self, keys: Iterable[str]) -> None:
        """Keys just written through this shell: known at once, before any listing."""
        for k in keys:
            i = bisect.bisect_left(self._keys, k)
            if i == len(self._keys) or self._keys[i] != k:
                self._keys.insert(i, k)

    def invalidate(self) -> None:
        """After a write: everything listed so far becomes stale."""
        self.generation += 1

    def clear(self) -> None:
        """Another server: forget every key, and drop listings asked before now."""
        self._keys = []
        self._listed.clear()
        self.generation += 1
        self._since = self.generation


class KeyRefresher:
    """Lists prefixes from the server on a background thread (like pgcli's
    completion_refresher) and hands each listing to ``on_listed(prefix, keys, truncated,
    generation)``.  ``fetch(prefix, limit, timeout)`` returns a ``client.KeyList``.

    Requests for the same prefix wait as one; a request made while that prefix is being
    listed is listed again afterwards (the running listing may predate a write).
    """

    def __init__(self, fetch: Callable[[str, int, float], object],
                 on_listed: Callable[[str, list[str], bool, int], None],
                 limit: int = LIST_LIMIT, fetch_timeout: float = 3.0):
        self._fetch = fetch
        self._on_listed = on_listed
        self.limit = limit
        self.fetch_timeout = fetch_timeout
        self._cond = threading.Condition()
        self._queued: dict[str, int] = {}  # prefix -> generation, in request order
        self._busy = 0  # listings running in the worker
        self._worker: threading.Thread | None = None
        self._closed = False
        self._recent: list[str] = []  # prefixes completed lately, newest last
        self.fetches = 0  # server listings made (for tests / bench)

    def used(self, prefix: str) -> None:
        """A completion of ``prefix``: it is among those re-listed after a write."""
        with self._cond:
            if prefix in self._recent:
                self._recent.remove(prefix)
            self._recent.append(prefix)
            del self._recent[:-RECENT]

    def refresh(self, prefix: str, generation: int) -> bool:
        """List ``prefix`` now, in the calling thread. False on any error."""
        try:
            res = self._fetch(prefix, self.limit, self.fetch_timeout)
        except Exception:  # noqa: BLE001 - completion must never raise
            return False
        with self._cond:
            self.fetches += 1
        self._on_listed(prefix, list(res.keys), bool(res.truncated), generation)
        return True

    def refresh_async(self, prefix: str, generation: int) -> None:
        """List ``prefix`` on the background thread."""
        with self._cond:
            if self._closed:
                return
            self._queued[prefix] = max(generation, self._queued.get(prefix, generation))
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="kvs-key-refresher",
                                                daemon=True)
                self._worker.start()

    def refresh_recent(self, generation: int) -> None:
        """After a write: re-list the prefixes used lately, the newest first."""
        with self._cond:
            recent = list(reversed(self._recent))
        for prefix in recent:
            self.refresh_async(prefix, generation)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed or not self._queued:
                    self._worker = None  # the next request starts a new one
                    self._cond.notify_all()
                    return
                prefix = next(iter(self._queued))
                generation = self._queued.pop(prefix)
                self._busy += 1
            try:
                self.refresh(prefix, generation)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Until no listing is queued or running (for tests). False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._busy, timeout)

    def close(self) -> None:
        """No more listings; a running one finishes."""
        with self._cond:
            self._closed = True
            self._queued.clear()
            self._cond.notify_all()


class VersionCache:
    """key -> [(version, value preview)] newest first, from ``history(key)``."""

    def __init__(self, history: Callable[[str], object], max_keys: int = 256):
        self._history = history
        self._cache: dict[str, list[tuple[int, str]]] = {}
        self._max = max_keys
        self._lock = threading.Lock()

    def versions(self, key: str) -> list[tuple[int, str]]:
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            h = self._history(key)
        except Exception:  # noqa: BLE001
            return []
        vs = sorted(((v.version, v.value) for v in h.versions), reverse=True)
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = vs
        return vs

    def invalidate(self, keys: Iterable[str] | None = None) -> None:
        with self._lock:
            if keys is None:
                self._cache.clear()
            else:
                for k in keys:
                    self._cache.pop(k, None)


POSITION_TTL = 2.0  # s a Retention answer serves position completions
KEEP_HINTS = (("0", "keep every version"), ("1", "only the newest version"), ("3", ""),
              ("10", ""))

TIME_HINTS = (("5m ago", "five minutes ago"), ("1h ago", "an hour ago"),
              ("1d ago", "a day ago"), ("now", "the current time"))


def _preview(value: str) -> str:
    v = value.replace("\n", "\\n").replace("\t", " ")
    return v if len(v) <= PREVIEW else v[: PREVIEW - 1] + "…"


class KVSCompleter(Completer):
    """Completes the command word, then each argument by its kind (see commands.py)."""

    def __init__(self, client_source: Callable[[], object], limit: int = LIST_LIMIT,
                 fetch_timeout: float = 3.0):
        self._source = client_source
        self.index = KeyIndex()
        self._lock = threading.Lock()  # guards index: the completion, refresher and UI threads
        self.refresher = KeyRefresher(
            lambda prefix, limit, timeout: self._source().list_keys(prefix, limit=limit,
                                                                   timeout=timeout),
            self._listed, limit=limit, fetch_timeout=fetch_timeout)
        self.versions = VersionCache(lambda key: self._source().history(key))
        self.fetch_timeout = fetch_timeout
        self._nodes: dict[str, str] | None = None  # node id -> description; None: never seen
        self._positions: tuple[float, object] | None = None  # (when, client.RetentionInfo)

    def _listed(self, prefix: str, keys: list[str], truncated: bool, generation: int) -> None:
        with self._lock:
            self.index.merge(prefix, keys, truncated, generation)

    def complete_keys(self, prefix: str) -> list[str]:
        """Keys for a completion: from the index, listing the prefix first if it was never
        listed, or in the background if stale.  Call from the completion thread."""
        self.refresher.used(prefix)
        with self._lock:
            keys, state = self.index.complete(prefix)
            generation = self.index.generation
        if state == "missing" and self.refresher.refresh(prefix, generation):
            with self._lock:
                keys = self.index.lookup(prefix)
        elif state == "stale":
            self.refresher.refresh_async(prefix, generation)
        return keys

    def saw_nodes(self, nodes: Iterable[tuple[str, str]]) -> None:
        """The members a command just showed: they replace what was known (a removed
        member stops completing)."""
        self._nodes = {n: meta for n, meta in nodes if n}

    def _known_nodes(self) -> dict[str, str]:
        if self._nodes is None:
            try:
                ml = self._source().member_list(timeout=self.fetch_timeout)
            except Exception:  # noqa: BLE001 - completion must never raise
                return {}
            self.saw_nodes(C.node_names(ml.members))
        return self._nodes or {}

    def retention(self):
        """The last ``client.RetentionInfo`` (at most POSITION_TTL s old), or None when no
        server answers.  Call from the completion thread."""
        hit = self._positions
        now = time.monotonic()
        if hit is not None and now - hit[0] < POSITION_TTL:
            return hit[1]
        try:
            info = self._source().retention()
        except Exception:  # noqa: BLE001 - completion must never raise
            return None
        self._positions = (now, info)
        return info

    def _position_hints(self, cmd) -> list[tuple[int, str]]:
        info = self.retention()
        if info is None:
            return []
        if cmd.name == "compact":
            return [(info.position, "the current position (last applied)")]
        hints = [(info.position + 1, "the next change (from now)"),
                 (info.position, "the last change, then on"),
                 (info.oldest_watch, "the oldest position the servers keep")]
        seen: set[int] = set()
        return [(p, m) for p, m in hints if p >= 1 and not (p in seen or seen.add(p))]

    def _keep_hints(self) -> list[tuple[str, str]]:
        info = self.retention()
        hints = list(KEEP_HINTS)
        if info is not None:
            cur = str(info.keep_versions)
            if cur not in (h for h, _ in hints):
                hints.insert(0, (cur, ""))
            hints = [(h, (m + ", " if m else "") + "current" if h == cur else m)
                     for h, m in hints]
        return hints

    # called by the shell
    def wrote(self, keys: Iterable[str] | None, added: Iterable[str] = ()) -> None:
        """After a write of ``keys`` (``added``: those now known to exist); None: of keys
        not known (import, compact, retention): every cached version list goes."""
        self.versions.invalidate(None if keys is None else list(keys))
        self._positions = None
        with self._lock:
            self.index.add(added)
            self.index.invalidate()
            generation = self.index.generation
        self.refresher.refresh_recent(generation)

    def reset(self) -> None:
        with self._lock:
            self.index.clear()
        self.versions.invalidate()
        self._nodes = None
        self._positions = None

    def close(self) -> None:
        self.refresher.close()

    def get_completions(self, document: Document, complete_event: CompleteEvent):
        text = document.text_before_cursor
        words, new_word = current_command(text)
        if words is None:
            return
        if not words or (len(words) == 1 and not new_word):
            typed = words[0].text if words else ""
            yield from self._commands(typed.lower(), len(words[0].text) if words else 0,
                                      text, words)
            return
        cmd = C.lookup(words[0].text)
        if cmd is None:
            return
        args = words[1:]
        current = "" if new_word else args[-1].text
        raw_len = 0 if new_word else len(text) - args[-1].start
        texts = [a.text for a in args] + ([""] if new_word else [])
        kinds = C.word_kinds(cmd, texts)
        kind = kinds[-1]
        positional = [t for t, k in zip(texts[:-1], kinds)
                      if k not in (C.OPTION, C.TIME, C.COUNT, C.POSITION)]
        if cmd.options and current.startswith("-") and kind != C.TIME:
            kind = C.OPTION
        if kind == C.OPTION:
            for o in cmd.options:
                if o.name.startswith(current) and o.name not in texts[:-1]:
                    yield Completion(o.name, -raw_len, display_meta=o.summary)
        elif kind == C.TIME:
            for t, meta in TIME_HINTS:
                if t.startswith(current):
                    yield Completion(quote(t), -raw_len, display=t, display_meta=meta)
        elif kind == C.COUNT:
            for n in ("10", "25", "100", "1000"):
                if n.startswith(current):
                    yield Completion(n, -raw_len)
        elif kind in (C.KEY, C.PREFIX):
            yield from self._keys(current, raw_len)
        elif kind == C.POSITION:
            for p, meta in self._position_hints(cmd):
                if str(p).startswith(current):
                    yield Completion(str(p), -raw_len, display_meta=meta)
        elif kind == C.KEEP:
            for n, meta in self._keep_hints():
                if n.startswith(current):
                    yield Completion(n, -raw_len, display_meta=meta)
        elif kind == C.FILE:
            from prompt_toolkit.completion import PathCompleter
            for c in PathCompleter(expanduser=True).get_completions(Document(current),
                                                                   complete_event):
                yield Completion(quote(current[:len(current) + c.start_position] + c.text),
                                 -raw_len, display=c.display, display_meta=c.display_meta)
        elif kind == C.KEYVER:
            if "@" in current:
                key, _, ver = current.rpartition("@")
                if len(key) >= C.MIN_LEN:
                    for v, val in self.versions.versions(key):
                        if str(v).startswith(ver):
                            yield Completion(f"{quote(key)}@{v}", -raw_len,
                                             display=f"{key}@{v}", display_meta=_preview(val))
            else:
                yield from self._keys(current, raw_len)
        elif kind == C.VERSION and cmd.args and cmd.args[0] == C.KEY and positional:
            key = positional[0]
            if len(key) >= C.MIN_LEN:
                for v, val in self.versions.versions(key):
                    if str(v).startswith(current):
                        yield Completion(str(v), -raw_len, display_meta=_preview(val))
        elif C.choices(kind):
            for w in C.choices(kind):
                if w.startswith(current.lower()):
                    yield Completion(w, -raw_len)
        elif kind == C.NODE:
            if args[0].text.lower() == "remove":
                for node, meta in sorted(self._known_nodes().items()):
                    if node.startswith(current):
                        yield Completion(quote(node), -raw_len, display=node,
                                         display_meta=meta)
        elif kind == C.COMMAND:
            for c in C.COMMANDS:
                if c.name.startswith(current.lower()):
                    yield Completion(c.name, -raw_len, display_meta=c.summary)
        elif kind == C.SERVER:
            client = self._source()
            seen = []
            if client is not None:
                seen = [",".join(client.addresses), *client.addresses]
            for s in dict.fromkeys(seen):
                if s.startswith(current):
                    yield Completion(s, -raw_len)

    def _commands(self, typed: str, raw_len: int, text: str, words):
        for c in C.COMMANDS:
            for i, name in enumerate(c.names):
                if name.startswith(typed):
                    yield Completion(name, -raw_len, display_meta=(
                        c.summary if i == 0 else f"alias of {c.name}"))

    def _keys(self, prefix: str, raw_len: int):
        for k in self.complete_keys(prefix):
            yield Completion(quote(k), -raw_len, display=k)
