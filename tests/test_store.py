"""Tests for server/store.py: the pure versioned store (SPEC §1-§2 semantics).

Two parts:
* example tests, one (or a few) per SPEC §2 rule as it applies to the store;
* a hypothesis state machine comparing VersionedStore with a trivially simple
  reference model over random operation sequences (small key alphabet so keys
  collide), including dump()/load_key() state transfer.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from server.store import (
    INT32_MAX,
    MIN_LEN,
    InvalidInput,
    Version,
    VersionedStore,
    check_key,
    check_value,
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make(*ops: tuple) -> VersionedStore:
    """Build a store from ("k", "v") inserts."""
    s = VersionedStore()
    for key, value in ops:
        s.insert(key, value)
    return s


def state_of(store: VersionedStore) -> dict:
    """A comparable picture of everything a store holds (via dump())."""
    return {key: (mx, [tuple(v) for v in vs]) for key, mx, vs in store.dump()}


def copy_via_dump(store: VersionedStore) -> VersionedStore:
    other = VersionedStore()
    for key, mx, versions in store.dump():
        other.load_key(key, mx, list(versions))
    return other


def snap(store: VersionedStore, ver=None) -> list[tuple[str, int, str]]:
    return [(k, v.number, v.value) for k, v in store.snapshot(ver)]


# ---------------------------------------------------------------------------
# insert: first insert -> 1, +1 per insert
# ---------------------------------------------------------------------------
def test_first_insert_is_version_1():
    s = VersionedStore()
    assert s.insert("key", "val") == 1
    assert s.max_version("key") == 1
    got = s.get("key")
    assert got is not None and got.number == 1 and got.value == "val"


def test_each_insert_increments_per_key():
    s = VersionedStore()
    assert [s.insert("aaa", f"v{i:02d}") for i in range(5)] == [1, 2, 3, 4, 5]
    # numbering is per key: another key starts at 1 independently
    assert s.insert("bbb", "xxx") == 1
    assert s.insert("aaa", "v05") == 6
    assert s.insert("bbb", "yyy") == 2
    assert s.max_version("aaa") == 6 and s.max_version("bbb") == 2


def test_insert_keeps_metadata():
    s = VersionedStore()
    s.insert("key", "val", seq=42, written_at=1.5, node="node-1")
    assert s.get("key") == Version(1, "val", 42, 1.5, "node-1")


def test_insert_same_value_twice_creates_two_versions():
    s = make(("key", "same"), ("key", "same"))
    assert [v.number for v in s.history("key")] == [2, 1]


# ---------------------------------------------------------------------------
# remove
# ---------------------------------------------------------------------------
def test_remove_exact_version():
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    assert s.remove("key", 2) == 2
    assert [v.number for v in s.history("key")] == [3, 1]
    assert s.get("key", 2).number == 1
    assert s.get("key").number == 3
    # removing it again: that exact version no longer exists
    assert s.remove("key", 2) == -1


def test_remove_exact_latest_then_latest_is_next_lower():
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    assert s.remove("key", 3) == 3
    assert s.get("key").number == 2
    assert s.max_version("key") == 3
    assert s.insert("key", "v-4") == 4  # 3 is never reused


def test_remove_nonexistent_exact_version_is_minus_1_and_no_change():
    s = make(("key", "v-1"), ("key", "v-2"))
    before = state_of(s)
    assert s.remove("key", 3) == -1       # never existed (above max)
    assert s.remove("key", 99) == -1
    assert s.remove("key", INT32_MAX) == -1
    assert state_of(s) == before
    assert s.remove("key", 1) == 1
    assert s.remove("key", 1) == -1       # existed, already removed
    assert [v.number for v in s.history("key")] == [2]


def test_remove_all_returns_highest_removed():
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    s.remove("key", 3)  # highest live is now 2
    assert s.remove("key") == 2
    assert s.history("key") == []
    assert s.get("key") is None
    assert "key" not in s
    assert len(s) == 0


@pytest.mark.parametrize("no_version", [None, 0, -1, -(2**31)])
def test_remove_no_version_means_remove_all(no_version):
    s = make(("key", "v-1"), ("key", "v-2"), ("oth", "v-1"))
    assert s.remove("key", no_version) == 2
    assert "key" not in s
    assert s.get("oth").value == "v-1"  # other keys untouched


def test_remove_exact_of_version_dropped_by_remove_all_after_reinsert():
    s = make(("key", "v-1"), ("key", "v-2"))
    assert s.remove("key") == 2
    assert s.insert("key", "v-3") == 3
    assert s.remove("key", 1) == -1
    assert s.remove("key", 2) == -1
    assert s.history("key") == [Version(3, "v-3")]
    assert s.get("key", 2) is None
    assert s.remove("key", 3) == 3


def test_remove_all_on_key_without_live_versions_is_minus_1():
    s = make(("key", "v-1"))
    assert s.remove("key") == 1
    assert s.remove("key") == -1
    assert s.remove("key", 1) == -1
    assert s.max_version("key") == 1


def test_remove_unknown_key_is_minus_1():
    s = make(("key", "v-1"))
    assert s.remove("nope") == -1
    assert s.remove("nope", 1) == -1
    assert s.remove("nope", 0) == -1
    # failed removes do not create the key
    assert s.total_keys() == 1
    assert s.max_version("nope") == 0


def test_remove_exact_last_live_version_makes_key_not_live():
    s = make(("key", "v-1"))
    assert s.remove("key", 1) == 1
    assert "key" not in s
    assert s.keys() == ([], False)
    assert snap(s) == []
    assert s.total_keys() == 1


# ---------------------------------------------------------------------------
# numbering continues at max ever + 1; removed numbers never reused
# ---------------------------------------------------------------------------
def test_numbering_continues_after_remove_all():
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    assert s.remove("key") == 3
    assert s.max_version("key") == 3
    assert s.insert("key", "new") == 4
    assert [v.number for v in s.history("key")] == [4]
    assert s.get("key", 3) is None  # nothing <= 3 is live


def test_numbering_uses_max_ever_not_max_live():
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    s.remove("key", 3)
    s.remove("key", 2)
    assert s.insert("key", "v-4") == 4
    s.remove("key")
    s.remove("key", 4)  # -1, already gone
    assert s.insert("key", "v-5") == 5


def test_removed_number_never_reused_many_cycles():
    s = VersionedStore()
    seen = set()
    for _ in range(10):
        n = s.insert("key", "val")
        assert n not in seen
        seen.add(n)
        s.remove("key")
    assert seen == set(range(1, 11))


def test_int32_exhaustion():
    s = VersionedStore()
    s.load_key("key", INT32_MAX - 1, [])
    assert s.insert("key", "last") == INT32_MAX
    before = state_of(s)
    assert s.insert("key", "over") == -1
    assert state_of(s) == before
    assert s.remove("key") == INT32_MAX
    assert s.insert("key", "over") == -1  # still exhausted after remove-all
    assert "key" not in s


# ---------------------------------------------------------------------------
# get
# ---------------------------------------------------------------------------
def test_get_greatest_live_version_le_ver():
    s = make(*[("key", f"v-{i}") for i in range(1, 6)])
    for ver in range(1, 6):
        assert s.get("key", ver) == Version(ver, f"v-{ver}")
    # above the max: latest
    assert s.get("key", 6).number == 5
    assert s.get("key", INT32_MAX).number == 5


def test_get_after_version_removed_returns_next_lower_live():
    s = make(*[("key", f"v-{i}") for i in range(1, 6)])
    s.remove("key", 4)
    s.remove("key", 3)
    assert s.get("key", 4) == Version(2, "v-2")
    assert s.get("key", 3) == Version(2, "v-2")
    assert s.get("key", 5) == Version(5, "v-5")
    s.remove("key", 1)
    s.remove("key", 2)
    assert s.get("key", 4) is None   # nothing live <= 4
    assert s.get("key", 1) is None


@pytest.mark.parametrize("no_version", [None, 0, -1, -(2**31)])
def test_get_no_version_is_latest(no_version):
    s = make(("key", "v-1"), ("key", "v-2"), ("key", "v-3"))
    assert s.get("key", no_version) == Version(3, "v-3")
    s.remove("key", 3)
    assert s.get("key", no_version) == Version(2, "v-2")


def test_get_unknown_key_is_none():
    s = make(("key", "v-1"))
    assert s.get("nope") is None
    assert s.get("nope", 1) is None
    assert s.get("nope", 0) is None
    assert s.total_keys() == 1  # reads do not create keys


def test_get_key_with_no_live_versions_is_none():
    s = make(("key", "v-1"))
    s.remove("key")
    assert s.get("key") is None
    assert s.get("key", 1) is None
    assert s.get("key", 5) is None


# ---------------------------------------------------------------------------
# snapshot
# ---------------------------------------------------------------------------
def test_snapshot_latest_sorted():
    s = make(("ccc", "c-1"), ("aaa", "a-1"), ("bbb", "b-1"), ("aaa", "a-2"))
    expected = [("aaa", 2, "a-2"), ("bbb", 1, "b-1"), ("ccc", 1, "c-1")]
    assert snap(s) == expected
    assert snap(s, 0) == expected
    assert snap(s, -3) == expected


def test_snapshot_at_version_leaves_out_keys_with_nothing_qualifying():
    s = make(("aaa", "a-1"), ("aaa", "a-2"), ("aaa", "a-3"),
             ("bbb", "b-1"), ("bbb", "b-2"), ("ccc", "c-1"))
    s.remove("ccc", 1)              # ccc has nothing live at all
    s.remove("bbb", 1)              # bbb: only version 2 live
    assert snap(s, 1) == [("aaa", 1, "a-1")]
    assert snap(s, 2) == [("aaa", 2, "a-2"), ("bbb", 2, "b-2")]
    assert snap(s, 3) == [("aaa", 3, "a-3"), ("bbb", 2, "b-2")]
    assert snap(s, 100) == [("aaa", 3, "a-3"), ("bbb", 2, "b-2")]
    s.remove("aaa", 2)
    assert snap(s, 2) == [("aaa", 1, "a-1"), ("bbb", 2, "b-2")]


def test_snapshot_empty_store_and_nothing_qualifying():
    assert snap(VersionedStore()) == []
    s = make(("aaa", "a-1"), ("aaa", "a-2"))
    s.remove("aaa", 1)
    assert snap(s, 1) == []   # caller turns this into the blank Tupla
    s.remove("aaa")
    assert snap(s) == []


def test_snapshot_unicode_keys_sorted_by_code_point():
    s = make(("zzz", "v-1"), ("ção", "v-1"), ("Abc", "v-1"), ("abc", "v-1"))
    assert [k for k, _, _ in snap(s)] == sorted(["zzz", "ção", "Abc", "abc"])


def test_snapshot_tolerates_mutation_during_iteration():
    s = make(("aaa", "a-1"), ("bbb", "b-1"), ("ccc", "c-1"))
    out = []
    for key, _ in s.snapshot():
        out.append(key)
        if key == "aaa":
            s.remove("aaa")
    assert out == ["aaa", "bbb", "ccc"]


# ---------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------
def test_history_newest_first_live_only():
    s = make(*[("key", f"v-{i}") for i in range(1, 5)])
    s.remove("key", 2)
    assert s.history("key") == [Version(4, "v-4"), Version(3, "v-3"), Version(1, "v-1")]


def test_history_unknown_or_empty():
    s = make(("key", "v-1"))
    assert s.history("nope") == []
    s.remove("key")
    assert s.history("key") == []


# ---------------------------------------------------------------------------
# keys(prefix, limit, start_after)
# ---------------------------------------------------------------------------
KEYS_FIXTURE = ["app", "apple", "apply", "banana", "band", "bandana", "cat"]


@pytest.fixture
def listing_store() -> VersionedStore:
    s = make(*[(k, "val") for k in reversed(KEYS_FIXTURE)])
    s.insert("dead", "val")
    s.remove("dead")  # not live: never listed
    return s


def test_keys_all_sorted(listing_store):
    assert listing_store.keys() == (KEYS_FIXTURE, False)
    assert len(listing_store) == len(KEYS_FIXTURE)


def test_keys_prefix(listing_store):
    assert listing_store.keys("app") == (["app", "apple", "apply"], False)
    assert listing_store.keys("appl") == (["apple", "apply"], False)
    assert listing_store.keys("ban") == (["banana", "band", "bandana"], False)
    assert listing_store.keys("dea") == ([], False)
    assert listing_store.keys("zzz") == ([], False)
    assert listing_store.keys("cat") == (["cat"], False)
    assert listing_store.keys("cats") == ([], False)


def test_keys_limit_and_truncated(listing_store):
    assert listing_store.keys("", limit=3) == (["app", "apple", "apply"], True)
    assert listing_store.keys("app", limit=3) == (["app", "apple", "apply"], False)
    assert listing_store.keys("app", limit=2) == (["app", "apple"], True)
    assert listing_store.keys("", limit=len(KEYS_FIXTURE)) == (KEYS_FIXTURE, False)
    assert listing_store.keys("", limit=0) == ([], True)
    assert listing_store.keys("zzz", limit=0) == ([], False)


def test_keys_paging_with_start_after(listing_store):
    pages, after = [], None
    for _ in range(10):  # bounded: a paging bug must fail, not hang
        page, truncated = listing_store.keys("", limit=2, start_after=after)
        pages.append(page)
        if not truncated:
            break
        after = page[-1]
    assert pages == [["app", "apple"], ["apply", "banana"], ["band", "bandana"], ["cat"]]


def test_keys_paging_with_prefix(listing_store):
    assert listing_store.keys("ban", limit=2) == (["banana", "band"], True)
    assert listing_store.keys("ban", limit=2, start_after="band") == (["bandana"], False)
    assert listing_store.keys("ban", limit=2, start_after="bandana") == ([], False)


def test_keys_start_after_not_a_key(listing_store):
    # start_after need not be an existing key: strictly-greater keys are listed
    assert listing_store.keys("", start_after="b") == (
        ["banana", "band", "bandana", "cat"], False)
    assert listing_store.keys("", start_after="apple0") == (
        ["apply", "banana", "band", "bandana", "cat"], False)
    # start_after below the prefix range: the whole prefix range
    assert listing_store.keys("ban", start_after="a") == (["banana", "band", "bandana"], False)
    # start_after above the prefix range: nothing
    assert listing_store.keys("app", start_after="b") == ([], False)
    assert listing_store.keys("", start_after="zzz") == ([], False)


def test_keys_prefix_equal_to_start_after(listing_store):
    assert listing_store.keys("app", start_after="app") == (["apple", "apply"], False)


# ---------------------------------------------------------------------------
# dump / load_key
# ---------------------------------------------------------------------------
def _busy_store() -> VersionedStore:
    s = VersionedStore()
    for i in range(1, 5):
        s.insert("aaa", f"a-{i}", seq=i, written_at=float(i), node="n1")
    s.remove("aaa", 2)
    s.insert("bbb", "b-1", seq=10, node="n2")
    s.insert("bbb", "b-2", seq=11, node="n2")
    s.remove("bbb")                     # no live versions, max_version 2
    s.insert("ção", "vão", seq=12)
    s.insert("ccc", "c-1")
    s.remove("ccc", 1)                  # no live versions via exact removes
    return s


def test_dump_includes_keys_without_live_versions():
    d = {k: (mx, [v.number for v in vs]) for k, mx, vs in _busy_store().dump()}
    assert d == {"aaa": (4, [1, 3, 4]), "bbb": (2, []), "ção": (1, [1]), "ccc": (1, [])}


def test_dump_load_round_trip_identical():
    s = _busy_store()
    t = copy_via_dump(s)
    assert state_of(t) == state_of(s)
    assert snap(t) == snap(s)
    assert t.keys() == s.keys()
    assert len(t) == len(s) and t.total_keys() == s.total_keys() == 4
    for key in ("aaa", "bbb", "ção", "ccc", "nope"):
        assert t.history(key) == s.history(key)
        assert t.max_version(key) == s.max_version(key)
        assert (key in t) == (key in s)
        for ver in range(-1, 6):
            assert t.get(key, ver) == s.get(key, ver)
    # both continue numbering identically, including keys with no live versions
    for key in ("aaa", "bbb", "ção", "ccc", "new"):
        assert t.insert(key, "next") == s.insert(key, "next")
    assert state_of(t) == state_of(s)
    assert t.insert("bbb", "again") == 4


def test_load_key_replaces_existing_key():
    s = make(("aaa", "a-1"), ("aaa", "a-2"), ("bbb", "b-1"))
    s.load_key("aaa", 7, [Version(7, "x-7"), Version(5, "x-5")])  # unsorted input
    assert [v.number for v in s.history("aaa")] == [7, 5]
    assert s.get("aaa", 6) == Version(5, "x-5")
    assert s.insert("aaa", "x-8") == 8
    # live -> not live
    s.load_key("bbb", 3, [])
    assert "bbb" not in s and s.keys() == (["aaa"], False)
    assert s.insert("bbb", "b-4") == 4
    # not live -> live
    s.remove("aaa")
    s.load_key("aaa", 9, [Version(9, "y-9")])
    assert s.keys() == (["aaa", "bbb"], False)
    # live -> live (no duplicate in the listing)
    s.load_key("aaa", 10, [Version(10, "z-10")])
    assert s.keys() == (["aaa", "bbb"], False)
    assert snap(s) == [("aaa", 10, "z-10"), ("bbb", 4, "b-4")]
    # not live -> not live
    s.load_key("ccc", 2, [])
    s.load_key("ccc", 3, [])
    assert "ccc" not in s and s.max_version("ccc") == 3 and s.total_keys() == 3


def test_load_into_store_that_already_has_the_data_is_noop():
    s = _busy_store()
    before = state_of(s)
    for key, mx, vs in list(s.dump()):
        s.load_key(key, mx, list(vs))
    assert state_of(s) == before
    assert s.keys() == (["aaa", "ção"], False)


# ---------------------------------------------------------------------------
# check_key / check_value
# ---------------------------------------------------------------------------
CHECKERS = pytest.mark.parametrize("check", [check_key, check_value])


@CHECKERS
@pytest.mark.parametrize("text", ["abc", "ção", "日本語", "a b", "   ", "x" * 1000, "🙂🙂🙂",
                                  "\x00\x00\x00"])
def test_check_accepts_three_or_more_code_points(check, text):
    assert check(text) == text


@CHECKERS
@pytest.mark.parametrize("text", ["", "a", "ab", "çã", "🙂🙂"])
def test_check_rejects_short(check, text):
    with pytest.raises(InvalidInput):
        check(text)


def test_length_is_code_points_not_bytes():
    assert MIN_LEN == 3
    assert len("ção".encode()) == 5 and check_key("ção") == "ção"
    assert len("çã".encode()) == 4
    with pytest.raises(InvalidInput):
        check_value("çã")  # 4 bytes but only 2 characters


@CHECKERS
@pytest.mark.parametrize("bad", [None, 123, b"abc", bytearray(b"abcd"), ["a", "b", "c"], 3.14])
def test_check_rejects_non_str(check, bad):
    with pytest.raises(InvalidInput):
        check(bad)


@CHECKERS
def test_check_max_len(check):
    assert check("abcde", max_len=5) == "abcde"
    assert check("ção", max_len=3) == "ção"  # code points, not bytes
    with pytest.raises(InvalidInput):
        check("abcdef", max_len=5)
    with pytest.raises(InvalidInput):
        check("çãoç", max_len=3)
    assert check("x" * 10_000, max_len=None) == "x" * 10_000


def test_invalid_input_is_value_error():
    assert issubclass(InvalidInput, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=8))
def test_check_matches_code_point_length(text):
    for check in (check_key, check_value):
        if len(text) >= MIN_LEN:
            assert check(text) == text
        else:
            with pytest.raises(InvalidInput):
                check(text)


# ---------------------------------------------------------------------------
# stateful: VersionedStore vs a trivially simple reference model
# ---------------------------------------------------------------------------
KEY_ALPHABET = ["aaa", "aab", "abc", "abd", "bcd", "ção", "çãx", "zzz"]
PREFIXES = ["", "a", "aa", "ab", "abc", "b", "ç", "çã", "z", "q"]
START_AFTER = [None, "", "a", "aaa", "aab", "ab", "abc", "b", "bcd", "ç", "ção", "zzz", "zzzz"]
VALUES = st.sampled_from(["val", "v-1", "v-2", "vão", "🙂🙂🙂", "xxxxxxxx"])
KEYS = st.sampled_from(KEY_ALPHABET)
VERSIONS = st.integers(min_value=-2, max_value=14)
NO_VERSION = st.sampled_from([None, 0, -1])


class Model:
    """key -> (max_version, [(version, value), ...] ascending)."""

    def __init__(self) -> None:
        self.data: dict[str, list] = {}

    def insert(self, key, value):
        entry = self.data.setdefault(key, [0, []])
        entry[0] += 1
        entry[1].append((entry[0], value))
        return entry[0]

    def live(self, key):
        return self.data.get(key, [0, []])[1]

    def remove_exact(self, key, ver):
        entry = self.data.get(key)
        if entry is None:
            return -1
        for i, (n, _) in enumerate(entry[1]):
            if n == ver:
                del entry[1][i]
                return ver
        return -1

    def remove_all(self, key):
        entry = self.data.get(key)
        if entry is None or not entry[1]:
            return -1
        highest = max(n for n, _ in entry[1])
        entry[1] = []
        return highest

    def get(self, key, ver):
        live = self.live(key)
        if ver is not None and ver > 0:
            live = [(n, v) for n, v in live if n <= ver]
        return max(live) if live else None

    def snapshot(self, ver):
        out = []
        for key in sorted(self.data):
            got = self.get(key, ver)
            if got is not None:
                out.append((key, got[0], got[1]))
        return out

    def keys(self, prefix, limit, start_after):
        matching = [k for k in sorted(self.data)
                    if self.live(k) and k.startswith(prefix)
                    and (start_after is None or k > start_after)]
        if limit is not None and len(matching) > limit:
            return matching[:limit], True
        return matching, False


def pair(v: Version | None):
    return None if v is None else (v.number, v.value)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = VersionedStore()
        self.model = Model()
        self.seq = 0

    # -- mutations -------------------------------------------------------
    @rule(key=KEYS, value=VALUES)
    def insert(self, key, value):
        self.seq += 1
        got = self.store.insert(key, value, seq=self.seq, node="n")
        assert got == self.model.insert(key, value)
        assert self.store.get(key) == Version(got, value, self.seq, 0.0, "n")

    @rule(key=KEYS, ver=st.integers(min_value=1, max_value=14))
    def remove_exact(self, key, ver):
        assert self.store.remove(key, ver) == self.model.remove_exact(key, ver)

    @precondition(lambda self: any(live for _, live in self.model.data.values()))
    @rule(data=st.data())
    def remove_exact_live(self, data):
        # pick a version that exists, so successful exact removes are common
        choices = [(k, n) for k, (_, live) in self.model.data.items() for n, _ in live]
        key, ver = data.draw(st.sampled_from(sorted(choices)))
        assert self.store.remove(key, ver) == ver
        assert self.model.remove_exact(key, ver) == ver

    @precondition(lambda self: bool(self.model.data))
    @rule(data=st.data())
    def remove_exact_ever_issued(self, data):
        # any number the key ever had (live or already removed): removed ones -> -1
        key = data.draw(st.sampled_from(sorted(self.model.data)))
        ver = data.draw(st.integers(min_value=1, max_value=max(1, self.model.data[key][0])))
        assert self.store.remove(key, ver) == self.model.remove_exact(key, ver)

    @rule(key=KEYS, ver=NO_VERSION)
    def remove_all(self, key, ver):
        assert self.store.remove(key, ver) == self.model.remove_all(key)

    @rule(src=KEYS, dst=KEYS)
    def transfer_key(self, src, dst):
        """load_key over an existing (or new) key, with another key's dumped state."""
        dumped = {k: (mx, vs) for k, mx, vs in self.store.dump()}
        if src not in dumped:
            return
        mx, vs = dumped[src]
        self.store.load_key(dst, mx, list(vs))
        self.model.data[dst] = [mx, [(v.number, v.value) for v in vs]]

    @rule()
    def replace_store_via_dump(self):
        """State transfer mid-run: continue on a fresh store loaded from a dump."""
        fresh = copy_via_dump(self.store)
        assert state_of(fresh) == state_of(self.store)
        self.store = fresh

    # -- reads -------------------------------------------------------------
    @rule(key=KEYS, ver=st.one_of(st.none(), VERSIONS))
    def get(self, key, ver):
        assert pair(self.store.get(key, ver)) == self.model.get(key, ver)

    @rule(ver=st.one_of(st.none(), VERSIONS))
    def snapshot(self, ver):
        assert snap(self.store, ver) == self.model.snapshot(ver)

    @rule(prefix=st.sampled_from(PREFIXES),
          limit=st.one_of(st.none(), st.integers(min_value=0, max_value=4)),
          start_after=st.sampled_from(START_AFTER))
    def keys(self, prefix, limit, start_after):
        assert self.store.keys(prefix, limit, start_after) == \
            self.model.keys(prefix, limit, start_after)

    @rule(key=KEYS)
    def history(self, key):
        got = [(v.number, v.value) for v in self.store.history(key)]
        assert got == list(reversed(self.model.live(key)))

    # -- invariants --------------------------------------------------------
    @invariant()
    def per_key_agrees(self):
        for key in KEY_ALPHABET:
            entry = self.model.data.get(key)
            assert self.store.max_version(key) == (entry[0] if entry else 0)
            assert (key in self.store) == bool(entry and entry[1])
        assert len(self.store) == sum(1 for _, live in self.model.data.values() if live)
        assert self.store.total_keys() == len(self.model.data)

    def teardown(self):
        # dump/load equivalence at the end of every run
        copy = copy_via_dump(self.store)
        assert state_of(copy) == state_of(self.store)
        expected = {k: (mx, [n for n, _ in live]) for k, (mx, live) in self.model.data.items()}
        assert {k: (mx, [v.number for v in vs]) for k, mx, vs in copy.dump()} == expected
        assert snap(copy) == snap(self.store)
        assert copy.keys() == self.store.keys()
        for key in KEY_ALPHABET:
            assert copy.history(key) == self.store.history(key)
            for ver in range(-1, 16):
                assert copy.get(key, ver) == self.store.get(key, ver)
            assert copy.insert(key, "after") == self.store.insert(key, "after")
        assert state_of(copy) == state_of(self.store)


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
