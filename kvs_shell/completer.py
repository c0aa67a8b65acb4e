"""Completion of commands, keys and versions.

Keys come from the server (``KVSExt.ListKeys``, prefix + limit) into a
:class:`KeyCache`: one sorted Python list answered with ``bisect``, so a
completion costs O(log n + shown) whatever the number of keys.  A prefix that
was listed completely (not truncated) makes the cache authoritative for every
longer prefix, so typing more characters asks the server nothing.

Network calls never run on the UI thread: the shell wraps :class:`KVSCompleter`
in prompt_toolkit's ``ThreadedCompleter``, so the first completion of a new
prefix waits (at most ``fetch_timeout``) in the completion thread only, and
after a write the prefixes used lately are re-listed by a background thread
(stale entries keep answering meanwhile).

Versions (for ``get KEY VER``, ``del KEY VER``, ``diff KEY V1 V2``, ``mget KEY@VER``) come from
``KVSExt.History`` of the key already typed, newest first, with a preview of
the value as completion meta; cached per key until that key is written.

Options (``--limit``, ``--since``, ``--at``) complete by name, their values with hints
(``5m ago``...).  Node ids (``member remove NODE``) come from the last ``member list`` / ``status``
the shell ran; before any, from one ``KVSExt.MemberList`` in the completion thread.
"""
from __future__ import annotations

import bisect
import queue
import threading
import time
from typing import Callable, Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from . import commands as C
from .parser import current_command, quote

LIST_LIMIT = 200  # keys asked from the server per prefix
MAX_SHOWN = 100  # completions shown at once
PREVIEW = 30


def _next_prefix(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


class KeyCache:
    """Sorted cache of live keys, filled per prefix from ``fetch(prefix, limit, timeout)``."""

    def __init__(self, fetch: Callable[..., object], limit: int = LIST_LIMIT,
                 fetch_timeout: float = 3.0):
        self._fetch = fetch
        self.limit = limit
        self.fetch_timeout = fetch_timeout
        self._keys: list[str] = []
        # prefix -> (generation fetched at, complete?) ; complete: the server listed all of them
        self._fetched: dict[str, tuple[int, bool]] = {}
        self._recent: list[str] = []  # prefixes used lately, newest last
        self._gen = 0
        self._lock = threading.Lock()
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._pending: set[str] = set()
        self._worker: threading.Thread | None = None
        self.fetches = 0  # how many server listings were made (for tests / bench)

    # -- reading -------------------------------------------------------------
    def lookup(self, prefix: str, limit: int = MAX_SHOWN) -> list[str]:
        """Cached keys starting with ``prefix`` (never touches the network)."""
        keys = self._keys  # replaced, never mutated in place: safe without the lock
        lo = bisect.bisect_left(keys, prefix)
        out = []
        for k in keys[lo:lo + limit]:
            if not k.startswith(prefix):
                break
            out.append(k)
        return out

    def state(self, prefix: str) -> str:
        """'fresh' (cache answers), 'stale' (answers, refresh due) or 'missing'."""
        best = "missing"
        with self._lock:
            for p, (gen, complete) in self._fetched.items():
                if p == prefix or (complete and prefix.startswith(p)):
                    if gen == self._gen:
                        return "fresh"
                    best = "stale"
        return best

    def complete(self, prefix: str) -> list[str]:
        """Keys for a completion: from the cache, listing the prefix first if never seen.
        Call from the completion thread, not the UI thread."""
        self._use(prefix)
        st = self.state(prefix)
        if st == "missing":
            self.refresh(prefix)
        elif st == "stale":
            self.refresh_async(prefix)
        return self.lookup(prefix)

    # -- filling -------------------------------------------------------------
    def _use(self, prefix: str) -> None:
        with self._lock:
            if prefix in self._recent:
                self._recent.remove(prefix)
            self._recent.append(prefix)
            del self._recent[:-4]

    def refresh(self, prefix: str) -> bool:
        """List ``prefix`` from the server now and merge it. False on any error."""
        with self._lock:
            gen = self._gen
        try:
            res = self._fetch(prefix, self.limit, self.fetch_timeout)
        except Exception:  # noqa: BLE001 - completion must never raise
            return False
        self.fetches += 1
        self.merge(prefix, list(res.keys), bool(res.truncated), gen)
        return True

    def merge(self, prefix: str, keys: list[str], truncated: bool, gen: int | None = None) -> None:
        keys = sorted(keys)
        with self._lock:
            cur = self._keys
            lo = bisect.bisect_left(cur, prefix)
            if truncated and keys:
                hi = bisect.bisect_right(cur, keys[-1])
            else:
                nxt = _next_prefix(prefix)
                hi = len(cur) if nxt is None else bisect.bisect_left(cur, nxt)
            self._keys = cur[:lo] + keys + cur[hi:]
            self._fetched[prefix] = (self._gen if gen is None else gen, not truncated)

    def add(self, keys: Iterable[str]) -> None:
        """Keys just written through this shell: visible to completion at once."""
        with self._lock:
            cur = list(self._keys)
            for k in keys:
                i = bisect.bisect_left(cur, k)
                if i == len(cur) or cur[i] != k:
                    cur.insert(i, k)
            self._keys = cur

    def invalidate(self) -> None:
        """After a write: everything cached becomes stale; recent prefixes are re-listed
        in the background."""
        with self._lock:
            self._gen += 1
            recent = list(self._recent)
        for p in reversed(recent):
            self.refresh_async(p)

    def clear(self) -> None:
        with self._lock:
            self._keys = []
            self._fetched.clear()
            self._gen += 1

    # -- background refresh ----------------------------------------------------
    def refresh_async(self, prefix: str) -> None:
        with self._lock:
            if prefix in self._pending:
                return
            self._pending.add(prefix)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="kvs-key-cache",
                                                daemon=True)
                self._worker.start()
        self._queue.put(prefix)

    def _run(self) -> None:
        while True:
            try:
                prefix = self._queue.get(timeout=30)
            except queue.Empty:
                with self._lock:
                    if not self._pending:
                        self._worker = None
                        return
                continue
            if prefix is None:
                return
            try:
                self.refresh(prefix)
            finally:
                with self._lock:
                    self._pending.discard(prefix)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """For tests: wait until no background refresh is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._queue.put(None)


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
        self.keys = KeyCache(
            lambda prefix, limit, timeout: self._source().list_keys(prefix, limit=limit,
                                                                   timeout=timeout),
            limit=limit, fetch_timeout=fetch_timeout)
        self.versions = VersionCache(lambda key: self._source().history(key))
        self.fetch_timeout = fetch_timeout
        self._nodes: dict[str, str] | None = None  # node id -> description; None: never seen

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

    # called by the shell
    def wrote(self, keys: Iterable[str], added: Iterable[str] = ()) -> None:
        keys = list(keys)
        self.keys.add(added)
        self.versions.invalidate(keys)
        self.keys.invalidate()

    def reset(self) -> None:
        self.keys.clear()
        self.versions.invalidate()
        self._nodes = None

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
        positional = [t for t, k in zip(texts[:-1], kinds) if k not in (C.OPTION, C.TIME,
                                                                        C.COUNT)]
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
        for k in self.keys.complete(prefix):
            yield Completion(quote(k), -raw_len, display=k)
