"""Unit tests of the broker document codec: round trips, strict decoding, fuzzing."""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from server import codec
from server.codec import BadMessage
from server.raft.types import CONF, NOOP, NORMAL, Entry, Message, MsgType

MAX_INT = 2**63 - 1
PUT = {"id": "n:1:1", "op": "put", "k": "kkk", "v": "vvv", "node": "n"}
DEL = {"id": "n:1:2", "op": "del", "k": "kkk", "ver": None, "node": "n"}
DATA = {
    NORMAL: {"ts": 1700000000.25, "items": [PUT, dict(DEL, ver=3)]},
    CONF: {"op": "add_learner", "node": "d", "addr": "127.0.0.1:5003"},
    NOOP: None,
}
CONFS = [{"op": "add_learner", "node": "d", "addr": "h:1"}, {"op": "promote", "node": "d", "addr": ""},
         {"op": "remove", "node": "d", "addr": "h:1"},
         {"op": "bootstrap", "voters": [["a", "h:1"], ["b", "h:2"]]}]


def round_trip(m: Message, cid: str = "c-1") -> Message:
    got_cid, got = codec.decode_raft(codec.encode_raft(cid, m))
    assert got_cid == cid
    return got


def check_message(m: Message) -> None:
    """What every decoded message must be, checked independently of the codec."""
    assert isinstance(m.type, MsgType)
    assert isinstance(m.frm, str) and m.frm and isinstance(m.to, str) and m.to
    for n in (m.term, m.log_term, m.index, m.commit, m.hint):
        assert type(n) is int and 0 <= n <= MAX_INT
    assert type(m.reject) is bool and isinstance(m.ctx, str)
    for e in m.entries:
        assert type(e.term) is int and type(e.index) is int and 0 <= min(e.term, e.index)
        assert e.size > 0
        if e.kind == NOOP:
            assert e.data is None
        elif e.kind == NORMAL:
            assert set(e.data) == {"ts", "items"} and math.isfinite(e.data["ts"]) and e.data["items"]
            for it in e.data["items"]:
                want = {"id", "op", "k", "node"} | ({"v"} if it["op"] == "put" else {"ver"})
                assert set(it) == want and it["id"] and it["node"] and isinstance(it["k"], str)
                if it["op"] == "del":
                    assert it["ver"] is None or (type(it["ver"]) is int and -2**31 <= it["ver"] < 2**31)
                else:
                    assert it["op"] == "put" and isinstance(it["v"], str)
        else:
            assert e.kind == CONF
            if e.data["op"] == "bootstrap":
                assert set(e.data) == {"op", "voters"} and e.data["voters"]
                assert all(type(v) is list and len(v) == 2 and v[0] for v in e.data["voters"])
            else:
                assert e.data["op"] in ("add_learner", "promote", "remove")
                assert set(e.data) == {"op", "node", "addr"} and e.data["node"]


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mtype", list(MsgType))
def test_every_message_type_round_trips_without_entries(mtype):
    m = Message(mtype, "a", "b", term=7, log_term=6, index=MAX_INT, commit=5, reject=True,
                hint=3, ctx="read-42")
    got = round_trip(m)
    assert got == m and got.type is mtype


@pytest.mark.parametrize("mtype", list(MsgType))
@pytest.mark.parametrize("kind", [NORMAL, CONF, NOOP])
def test_every_message_type_round_trips_with_entries_of_each_kind(mtype, kind):
    entries = (Entry(2, 10, kind, DATA[kind]), Entry(2, 11, kind, DATA[kind]))
    got = round_trip(Message(mtype, "a", "b", term=2, log_term=1, index=9, entries=entries))
    assert got.entries == entries          # Entry equality ignores size
    assert [e.data for e in got.entries] == [DATA[kind]] * 2
    assert all(e.size > 0 for e in got.entries)
    check_message(got)


@pytest.mark.parametrize("conf", CONFS)
def test_every_conf_change_round_trips(conf):
    m = Message(MsgType.APP, "a", "b", entries=(Entry(1, 1, CONF, conf),))
    assert round_trip(m).entries[0].data == conf


def test_defaults_are_omitted_and_decoded_back():
    payload = codec.encode_raft("c", Message(MsgType.HB, "a", "b"))
    assert json.loads(payload) == {"t": "raft", "cid": "c", "type": "hb", "frm": "a", "to": "b"}
    assert codec.decode_raft(payload) == ("c", Message(MsgType.HB, "a", "b"))


def test_unicode_keys_and_values_survive_exactly():
    weird = ["\U0001F600\U00010348", "\x00\x01\x1f\x7f", "\u2028\u2029", 'q"\\/\b\f\n\r\t',
             "ção", "\ufeff\ufffd", "日本語キー"]
    items = [dict(PUT, id=f"n:{i}", k=w + "k", v=w * 3) for i, w in enumerate(weird)]
    items.append(dict(DEL, k=weird[0], ver=-2**31))
    e = Entry(1, 1, NORMAL, {"ts": 0.0, "items": items})
    payload = codec.encode_raft("clúster-\U0001F600", Message(MsgType.APP, "nó-1", "b", entries=(e,)))
    payload.decode("utf-8")   # valid UTF-8 throughout
    cid, got = codec.decode_raft(payload)
    assert cid == "clúster-\U0001F600" and got.frm == "nó-1"
    assert got.entries[0].data["items"] == items


def test_encode_decode_is_stable_after_one_round():
    # a proposer's dict order and int ts are normalised once, then bytes are fixed points
    data = {"items": [{"node": "n", "v": "vvv", "k": "kkk", "op": "put", "id": "x"}], "ts": 5}
    m = Message(MsgType.PROP, "a", "b", entries=(Entry(0, 0, NORMAL, data),))
    once = codec.encode_raft("c", codec.decode_raft(codec.encode_raft("c", m))[1])
    assert codec.encode_raft("c", codec.decode_raft(once)[1]) == once
    assert codec.decode_raft(once)[1].entries[0].data["ts"] == 5.0


def test_unknown_top_level_fields_are_tolerated():
    doc = json.loads(codec.encode_raft("c", Message(MsgType.VOTE, "a", "b", term=3)))
    doc["future"] = {"nested": [1, 2, {"x": None}]}
    assert codec.decode_raft(json.dumps(doc).encode()) == ("c", Message(MsgType.VOTE, "a", "b", term=3))
    pres = json.loads(codec.presence_doc("n", "h:1", True)) | {"zone": "eu"}
    assert codec.decode_presence(json.dumps(pres).encode()).node == "n"


def test_presence_round_trip_and_defaults():
    pr = codec.decode_presence(codec.presence_doc("n", "127.0.0.1:1", True, "boot-1", "c-1", 4, 9,
                                                  "leader"))
    assert pr == codec.Presence("n", "127.0.0.1:1", True, "boot-1", "c-1", 4, 9, "leader")
    assert (pr.node, pr.addr, pr.online, pr.boot, pr.cid, pr.term, pr.applied, pr.role) == \
        ("n", "127.0.0.1:1", True, "boot-1", "c-1", 4, 9, "leader")
    assert json.loads(codec.presence_doc("n", "", False))["t"] == "node"
    minimal = codec.decode_presence(b'{"t":"node","node":"n","addr":"","online":false}')
    assert minimal == codec.Presence("n", "", False)
    with pytest.raises(AttributeError):
        pr.online = False   # frozen: safe to share between threads


def test_join_round_trip():
    j = codec.decode_join(codec.join_doc("n", "h:1", "boot", "c-1", 1700000000.5))
    assert j == codec.Join("n", "h:1", "boot", "c-1", 1700000000.5)


def test_entry_helpers_round_trip_for_the_wal():
    for kind, data in [*DATA.items(), *((CONF, c) for c in CONFS)]:
        e = Entry(3, 99, kind, data)
        raw = codec.encode_entry(e)
        got = codec.decode_entry(raw)
        assert got == e and got.data == data and 0 < got.size <= len(raw)
    with pytest.raises(BadMessage):
        codec.decode_entry(b'[1,2,"normal",{"ts":1,"items":[]}]')


def test_check_entry_matches_what_decoding_accepts():
    for kind, data in DATA.items():
        codec.check_entry(Entry(1, 1, kind, data))
    # what a proposer naturally builds from ConfState.addrs (tuples) is fine too
    codec.check_entry(Entry(1, 1, CONF, {"op": "bootstrap", "voters": (("a", "h:1"),)}))
    bad = [(NORMAL, {"ts": float("nan"), "items": [PUT]}), (NORMAL, {"ts": float("inf"), "items": [PUT]}),
           (NORMAL, {"ts": 1, "items": [dict(PUT, extra=1)]}), (NOOP, {}), ("weird", None),
           (CONF, {"op": "bootstrap", "voters": []}), (NORMAL, {"ts": 1, "items": [dict(DEL, ver=2**31)]})]
    for kind, data in bad:
        with pytest.raises(BadMessage):
            codec.check_entry(Entry(1, 1, kind, data))


def test_generic_documents_for_state_transfer():
    doc = {"t": "state", "index": 5, "keys": [["kkk", 2, [[1, "v", False]]]]}
    assert codec.decode_object(codec.encode(doc)) == doc
    for bad in (b"[]", b"1", b"{", b"\xff"):
        with pytest.raises(BadMessage):
            codec.decode_object(bad)


# ---------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------
def raft(**over) -> bytes:
    doc = {"t": "raft", "cid": "c", "type": "app", "frm": "a", "to": "b", "term": 1,
           "entries": [[1, 1, "normal", {"ts": 1.0, "items": [PUT]}]]}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def ent(kind="normal", data=None, term=1, index=1):
    return raft(entries=[[term, index, kind, data]])


def items(*its):
    return ent(data={"ts": 1.0, "items": list(its)})


RAW_ENTRY = b'{"t":"raft","cid":"c","type":"app","frm":"a","to":"b","entries":[[1,1,"normal",%s]]}'

BAD_RAFT = [
    b"", b" ", b"\xff\xfe", b"[]", b"null", b"1", b'"raft"', b"{}", b"{", b'{"t":"raft"}',
    b"[" * 50000, b'{"t":"raft","x":' + b"[" * 50000 + b"]" * 50000 + b"}",
    raft() + b" trailing", raft(t="node"), raft(t="batch"), raft(t=None), raft(t=...),
    raft(type="append"), raft(type=None), raft(type=1), raft(type=...), raft(frm=""), raft(to=...),
    raft(cid=7), raft(cid=...), raft(term=-1), raft(term=2**63), raft(term=2**64 + 1),
    raft(term=10**30), raft(term=1.0), raft(term=True), raft(term="1"), raft(index=-5),
    raft(commit=None), raft(hint=1.5), raft(log_term=[1]), raft(reject=0), raft(reject="true"),
    raft(ctx=5), raft(entries=None), raft(entries={}), raft(entries=[[]]),
    raft(entries=[[1, 1, "normal"]]), raft(entries=[[1, 1, "noop", None, None]]),
    raft(entries=[{"term": 1, "index": 1, "kind": "noop", "data": None}]),
    ent("noop", 0), ent("noop", {}), ent("snapshot", None), ent(None, None), ent("NOOP", None),
    ent("noop", None, term=-1), ent("noop", None, index=2**63), ent("noop", None, index="1"),
    ent("normal", None), ent("normal", []), ent("normal", {"ts": 1.0}), ent("normal", {"items": [PUT]}),
    ent("normal", {"ts": 1.0, "items": []}), ent("normal", {"ts": "1", "items": [PUT]}),
    ent("normal", {"ts": None, "items": [PUT]}), ent("normal", {"ts": True, "items": [PUT]}),
    ent("normal", {"ts": -1.0, "items": [PUT]}), ent("normal", {"ts": 1.0, "items": PUT}),
    ent("normal", {"ts": 1.0, "items": [PUT], "extra": 1}),
    RAW_ENTRY % b'{"ts":1e999,"items":[%s]}' % json.dumps(PUT).encode(),
    RAW_ENTRY % b'{"ts":NaN,"items":[%s]}' % json.dumps(PUT).encode(),
    RAW_ENTRY % b'{"ts":Infinity,"items":[%s]}' % json.dumps(PUT).encode(),
    items(dict(PUT, op="drop")), items(dict(PUT, op=None)), items({k: v for k, v in PUT.items() if k != "op"}),
    items(dict(PUT, id="")), items(dict(PUT, node="")), items(dict(PUT, id=1)), items(dict(PUT, k=None)),
    items(dict(PUT, v=None)), items({k: v for k, v in PUT.items() if k != "v"}), items(dict(PUT, extra="x")),
    items(dict(PUT, ver=1)), items(dict(DEL, ver="1")), items(dict(DEL, ver=2**31)), items(dict(DEL, ver=-2**31 - 1)),
    items(dict(DEL, ver=1.0)), items(dict(DEL, ver=True)), items({k: v for k, v in DEL.items() if k != "ver"}),
    items(dict(DEL, v="x")), items(PUT, "put"), items(PUT, None), items([PUT]), items({"op": "epoch", "node": "n"}),
    ent("conf", None), ent("conf", {}), ent("conf", {"op": "join", "node": "d", "addr": ""}),
    ent("conf", {"op": "promote", "node": "", "addr": ""}), ent("conf", {"op": "promote", "addr": ""}),
    ent("conf", {"op": "promote", "node": "d"}), ent("conf", {"op": "remove", "node": "d", "addr": 1}),
    ent("conf", {"op": "remove", "node": "d", "addr": "", "voters": []}),
    ent("conf", {"op": "bootstrap", "voters": []}), ent("conf", {"op": "bootstrap"}),
    ent("conf", {"op": "bootstrap", "voters": [["a"]]}), ent("conf", {"op": "bootstrap", "voters": [["a", "h", "x"]]}),
    ent("conf", {"op": "bootstrap", "voters": [["", "h"]]}), ent("conf", {"op": "bootstrap", "voters": [{"a": "h"}]}),
    ent("conf", {"op": "bootstrap", "voters": "a"}), ent("conf", {"op": "bootstrap", "voters": [["a", "h"]], "node": "a"}),
    ent("conf", {"op": "add_learner", "node": "d", "addr": "", "voters": [["a", "h"]]}),
    ent("normal", {"ts": 1.0, "items": [{"id": "x", "op": "put", "k": "\ud800", "v": "v", "node": "n"}]}),
    b'{"t":"raft","cid":"c","type":"app","frm":"\xff","to":"b"}',
    b'{"t":"raft","cid":"c","type":"app","frm":"a","to":"b","entries":[[1,1,"noop",nul]]}',
    b'{"t":"raft","cid":"c","type":"app","frm":"a","to":"b","entries":[[1,1,"noop",' + b"[" * 50000 + b"]]}",
    RAW_ENTRY % (b'{"ts":1,"items":[' + b'{"a":' * 30000 + b"]}"),
]


@pytest.mark.parametrize("payload", BAD_RAFT, ids=range(len(BAD_RAFT)))
def test_malformed_raft_documents_are_refused(payload):
    with pytest.raises(BadMessage):
        codec.decode_raft(payload)


def test_the_good_shape_behind_the_bad_ones_is_accepted():
    # so BAD_RAFT fails for the one thing each case breaks, not the template
    for payload in (raft(), items(PUT, DEL), ent("noop", None), ent("conf", CONFS[-1])):
        check_message(codec.decode_raft(payload)[1])


@pytest.mark.parametrize("payload", [None, "{}", 5, bytearray(b"x"), memoryview(b"[]")])
def test_non_bytes_payloads_are_refused(payload):
    with pytest.raises(BadMessage):
        codec.decode_raft(payload)


def test_oversized_payloads_are_refused_before_parsing():
    huge = raft(ctx="x" * codec.MAX_DOC_BYTES)
    assert len(huge) > codec.MAX_DOC_BYTES
    with pytest.raises(BadMessage, match="too large"):
        codec.decode_raft(huge)


BAD_PRESENCE = [b"{}", b"[]", b'{"t":"raft","node":"n","addr":"","online":true}',
                b'{"t":"node","node":"","addr":"","online":true}', b'{"t":"node","node":"n","online":true}',
                b'{"t":"node","node":"n","addr":"","online":1}', b'{"t":"node","node":"n","addr":"","online":true,"term":-1}',
                b'{"t":"node","node":"n","addr":"","online":true,"applied":"1"}',
                b'{"t":"node","node":"n","addr":"","online":true,"boot":null}',
                b'{"t":"node","node":"n","addr":"","online":true,"role":3}']
BAD_JOIN = [b"{}", b'{"t":"join","node":"n","addr":"","boot":"b","cid":"c"}',
            b'{"t":"join","node":"","addr":"","boot":"b","cid":"c","ts":1}',
            b'{"t":"join","node":"n","addr":"","boot":"b","cid":"c","ts":"1"}',
            b'{"t":"join","node":"n","addr":"","boot":"b","cid":"c","ts":1e400}',
            b'{"t":"join","node":"n","addr":"","boot":"b","cid":"c","ts":-3}',
            b'{"t":"node","node":"n","addr":"","boot":"b","cid":"c","ts":1}']


@pytest.mark.parametrize("payload", BAD_PRESENCE)
def test_malformed_presence_is_refused(payload):
    with pytest.raises(BadMessage):
        codec.decode_presence(payload)


@pytest.mark.parametrize("payload", BAD_JOIN)
def test_malformed_join_is_refused(payload):
    with pytest.raises(BadMessage):
        codec.decode_join(payload)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=20)
names = st.text(min_size=1, max_size=8)
u63 = st.integers(min_value=0, max_value=MAX_INT)
# in the codec's canonical key order ("op" first), so encoding is a fixed point at once
put_items = st.builds(lambda i, k, v, n: {"op": "put", "id": i, "k": k, "v": v, "node": n},
                      names, st.text(), st.text(), names)
del_items = st.builds(lambda i, k, ver, n: {"op": "del", "id": i, "k": k, "ver": ver, "node": n},
                      names, st.text(), st.none() | st.integers(-2**31, 2**31 - 1), names)
normal_data = st.builds(lambda ts, its: {"ts": ts, "items": its},
                        st.floats(min_value=0, allow_infinity=False), st.lists(put_items | del_items, min_size=1, max_size=5))
conf_data = st.builds(lambda op, n, a: {"op": op, "node": n, "addr": a},
                      st.sampled_from(["add_learner", "promote", "remove"]), names, st.text()) \
    | st.builds(lambda vs: {"op": "bootstrap", "voters": vs}, st.lists(st.lists(names, min_size=2, max_size=2).map(
        lambda p: [p[0], p[1]]), min_size=1, max_size=3))
entries = st.one_of(st.builds(Entry, u63, u63, st.just(NORMAL), normal_data),
                    st.builds(Entry, u63, u63, st.just(CONF), conf_data),
                    st.builds(Entry, u63, u63, st.just(NOOP), st.none()))


def messages_with(entry_lists):
    return st.builds(Message, st.sampled_from(list(MsgType)), names, names, u63, u63, u63,
                     entry_lists.map(tuple), u63, st.booleans(), u63, st.text(max_size=8))


messages = messages_with(st.lists(entries, max_size=4))


def decode_all(payload):
    """Each decoder returns a well-formed document or raises BadMessage, nothing else."""
    for decode in (codec.decode_raft, codec.decode_presence, codec.decode_join,
                   codec.decode_entry, codec.decode_object):
        try:
            got = decode(payload)
        except BadMessage:
            continue
        if decode is codec.decode_raft:
            check_message(got[1])
            assert codec.encode_raft(got[0], got[1]) == codec.encode_raft(*codec.decode_raft(
                codec.encode_raft(got[0], got[1])))
        elif decode is codec.decode_presence:
            assert codec.decode_presence(codec.presence_doc(
                got.node, got.addr, got.online, got.boot, got.cid, got.term, got.applied, got.role)) == got


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda d: json.dumps(d).encode())))
def test_any_input_is_either_a_valid_document_or_bad_message(payload):
    decode_all(payload)


@settings(max_examples=300, deadline=None)
@given(messages, st.text(max_size=6))
def test_valid_messages_round_trip_and_encoding_is_a_fixed_point(m, cid):
    payload = codec.encode_raft(cid, m)
    got_cid, got = codec.decode_raft(payload)
    assert (got_cid, got) == (cid, m)
    assert [e.data for e in got.entries] == [e.data for e in m.entries]
    check_message(got)
    assert codec.encode_raft(got_cid, got) == payload


edge_values = st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 1.5, -0.0, "", "x", "put", "del",
                               "noop", None, True, [], {}, [[]]])


def _mutate(value, draw):
    """Change one randomly chosen node of a JSON tree: replace it with an edge
    case or arbitrary JSON, or drop or add a key of an object."""
    if isinstance(value, (dict, list)) and value and draw(st.integers(0, 4)) < 4:
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        k = draw(st.sampled_from(keys))
        how = draw(st.sampled_from(["deeper", "deeper", "drop", "add"]))
        if how == "drop":
            del value[k]
        elif how == "add" and isinstance(value, dict):
            value[draw(st.text(max_size=4))] = draw(edge_values | json_values)
        else:
            value[k] = _mutate(value[k], draw)
        return value
    return draw(edge_values | json_values)


@settings(max_examples=400, deadline=None)
@given(messages_with(st.lists(entries, min_size=1, max_size=3)), st.booleans(), st.data())
def test_mutated_documents_are_valid_or_bad_message(m, in_entries, data):
    doc = json.loads(codec.encode_raft("c", m))
    if in_entries:   # most of the shape to get wrong is there
        doc["entries"] = _mutate(doc["entries"], data.draw)
    else:
        doc = _mutate(doc, data.draw)
    decode_all(json.dumps(doc).encode())


def test_compact_and_retain_changes_are_strict():
    """Issue 12: retention travels as log entries; what a hostile proposer sends is refused
    before it reaches the applier."""
    good = {"ts": 1.0, "items": [{"op": "compact", "id": "c1", "pos": 7, "node": "n1"},
                                 {"op": "retain", "id": "r1", "keep": 10, "node": "n1"},
                                 {"op": "retain", "id": "r2", "keep": 0, "node": "n1"}]}
    e = Entry(2, 5, NORMAL, good)
    codec.check_entry(e)
    assert codec.decode_entry(codec.encode_entry(e)).data == good
    for item in ({"op": "compact", "id": "c", "pos": -1, "node": "n"},
                 {"op": "compact", "id": "c", "pos": "7", "node": "n"},
                 {"op": "compact", "id": "c", "node": "n"},
                 {"op": "retain", "id": "r", "keep": -1, "node": "n"},
                 {"op": "retain", "id": "r", "keep": 2**31, "node": "n"},
                 {"op": "retain", "id": "r", "keep": 3, "node": "n", "k": "key"},
                 {"op": "truncate", "id": "t", "node": "n"}):
        with pytest.raises(BadMessage):
            codec.check_entry(Entry(1, 1, NORMAL, {"ts": 1.0, "items": [item]}))
