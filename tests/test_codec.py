"""Unit tests of the broker document codec: strict decoding, round trips, the chain."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from server import codec
from server.codec import BadMessage


def test_batch_round_trip_and_positions():
    items = [{"id": "n:b:1", "op": "put", "k": "kkk", "v": "vvv", "node": "n"},
             {"id": "n:b:2", "op": "del", "k": "kkk", "ver": None, "node": "n"},
             {"op": "epoch", "node": "n"}]
    payload = codec.batch_doc(3, "n", 10, codec.GENESIS_HASH, 1.5, items)
    b = codec.decode_log(payload)
    assert isinstance(b, codec.Batch)
    assert (b.epoch, b.leader, b.first, b.last, b.ts) == (3, "n", 10, 12, 1.5)
    assert b.items == items and b.payload == payload
    assert b.hash == codec.chain_hash(payload) != codec.GENESIS_HASH


def test_chain_hash_depends_on_every_byte():
    a = codec.batch_doc(1, "n", 1, codec.GENESIS_HASH, 0, [{"op": "epoch", "node": "n"}])
    b = codec.batch_doc(1, "n", 1, codec.GENESIS_HASH, 0, [{"op": "epoch", "node": "m"}])
    assert codec.chain_hash(a) != codec.chain_hash(b)


def test_heartbeat_proposal_presence_round_trip():
    hb = codec.decode_log(codec.heartbeat_doc(2, "n", 7, "ab" * 16))
    assert hb == codec.Heartbeat(2, "n", 7, "ab" * 16)
    items = [{"id": "x", "op": "put", "k": "kkk", "v": "ção", "node": "n"}]
    p = codec.decode_proposal(codec.proposal_doc("n", items, 12.0))
    assert (p.node, p.items, p.ts) == ("n", items, 12.0)
    pr = codec.decode_presence(codec.presence_doc("n", "127.0.0.1:1", True, 4, 9))
    assert pr == codec.Presence("n", "127.0.0.1:1", True, 4, 9)


BAD_LOG = [
    b"", b"\xff\xfe", b"[]", b"null", b"{}", b'{"t":"batch"}', b"[" * 50000,
    b'{"t":"batch","epoch":0,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":0,"prev":"x","ts":0,"items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":0,"items":[]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":"0","items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"batch","epoch":true,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"batch","epoch":1.5,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"put","k":"a","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"drop","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"del","id":"i","k":"kkk","ver":"1","node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":1,"prev":"x","ts":0,"items":[{"op":"del","id":"i","k":"kkk","ver":4294967296,"node":"n"}]}',
    b'{"t":"batch","epoch":1,"leader":"n","first":99999999999999999999999,"prev":"x","ts":0,"items":[{"op":"epoch","node":"n"}]}',
    b'{"t":"hb","epoch":1,"leader":"","last":1,"hash":"x"}',
    b'{"t":"propose","node":"n","ts":0,"items":[{"id":"x","op":"put","k":"kkk","v":"vvv","node":"n"}]}',
]


@pytest.mark.parametrize("payload", BAD_LOG)
def test_malformed_log_documents_are_refused(payload):
    with pytest.raises(BadMessage):
        codec.decode_log(payload)


def test_proposals_are_checked():
    ok = {"t": "propose", "node": "n", "ts": 1.0,
          "items": [{"id": "x", "op": "put", "k": "kkk", "v": "vvv", "node": "n"}]}
    codec.decode_proposal(json.dumps(ok).encode())
    for broken in ({**ok, "ts": None}, {**ok, "items": []}, {**ok, "t": "batch"},
                   {**ok, "items": [{**ok["items"][0], "node": "other"}]},
                   {**ok, "items": [{"op": "epoch", "node": "n"}]}):
        with pytest.raises(BadMessage):
            codec.decode_proposal(json.dumps(broken).encode())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                              max_leaves=20).map(lambda d: json.dumps(d).encode())))
def test_any_input_is_either_a_valid_document_or_bad_message(payload):
    for decode in (codec.decode_log, codec.decode_proposal, codec.decode_presence):
        try:
            decode(payload)
        except BadMessage:
            pass
