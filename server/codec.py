"""The JSON documents on the broker (and in the WAL): typed, strict decoding.

Every broker document is a JSON object tagged by ``t`` ("raft", "node",
"join"); the shapes are msgspec Structs below and are documented in the
README.  Decoding either yields exactly such a document or raises
``BadMessage`` -- never another exception -- so garbage on our topics cannot
reach the Raft machine or the store.

Unknown fields: tolerated (ignored) at the top level of a document, so a newer
server may add a field without cutting older ones off the cluster; refused
inside entry data (items, conf changes), because an entry is replicated and
applied verbatim and every node must see exactly the same change.
"""
from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Raw, Struct

from .raft.types import CONF, NOOP, NORMAL, Entry, Message, MsgType

MAX_DOC_BYTES = 64 * 1024 * 1024  # refuse to even parse anything larger


class BadMessage(ValueError):
    """A payload that is not a well-formed KVS document."""


# ints fit an int64 (msgspec cannot bound beyond it); log positions are >= 0
U64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Int32 = Annotated[int, Meta(ge=-2**31, le=2**31 - 1)]
Name = Annotated[str, Meta(min_length=1)]
# a wall-clock time: finite (the bound refuses inf, JSON has no NaN and
# msgspec refuses 1e400), >= 0
Time = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]


# ---------------------------------------------------------------------------
# Entry data (strict: forbid_unknown_fields)
# ---------------------------------------------------------------------------
class Put(Struct, tag="put", tag_field="op", forbid_unknown_fields=True):
    id: Name
    k: str
    v: str
    node: Name


class Del(Struct, tag="del", tag_field="op", forbid_unknown_fields=True):
    id: Name
    k: str
    ver: Int32 | None   # None: every live version
    node: Name


class Compact(Struct, tag="compact", tag_field="op", forbid_unknown_fields=True):
    id: Name
    pos: U64            # drop versions superseded before this position
    node: Name


class Retain(Struct, tag="retain", tag_field="op", forbid_unknown_fields=True):
    id: Name
    keep: Annotated[int, Meta(ge=0, le=2**31 - 1)]   # live versions kept per key (0: all)
    node: Name


class NormalData(Struct, forbid_unknown_fields=True):
    ts: Time
    items: Annotated[list[Union[Put, Del, Compact, Retain]], Meta(min_length=1)]


class AddLearner(Struct, tag="add_learner", tag_field="op", forbid_unknown_fields=True):
    node: Name
    addr: str


class Promote(Struct, tag="promote", tag_field="op", forbid_unknown_fields=True):
    node: Name
    addr: str


class Remove(Struct, tag="remove", tag_field="op", forbid_unknown_fields=True):
    node: Name
    addr: str


class Voter(Struct, array_like=True, forbid_unknown_fields=True):
    node: Name   # [node, addr]: an array of exactly two (a list again after to_builtins)
    addr: str


class Bootstrap(Struct, tag="bootstrap", tag_field="op", forbid_unknown_fields=True):
    voters: Annotated[list[Voter], Meta(min_length=1)]


ConfData = Union[AddLearner, Promote, Remove, Bootstrap]

# The data of an entry is checked by its kind's decoder (it sits in the
# entry array after the kind, so a tagged union cannot select it).
_DATA_DECODERS = {NORMAL: msgspec.json.Decoder(NormalData),
                  CONF: msgspec.json.Decoder(ConfData),
                  NOOP: msgspec.json.Decoder(None)}
_DATA_TYPES = {NORMAL: NormalData, CONF: ConfData, NOOP: None}

# [term, index, kind, data]; data stays raw until its kind is known
WireEntry = tuple[U64, U64, Literal["normal", "conf", "noop"], Raw]


# ---------------------------------------------------------------------------
# Top-level documents (unknown fields tolerated)
# ---------------------------------------------------------------------------
class RaftDoc(Struct, tag="raft", tag_field="t", omit_defaults=True):
    """One Raft message to one node (``server.raft.types.Message`` + cluster id)."""
    cid: str
    type: MsgType
    frm: Name
    to: Name
    term: U64 = 0
    log_term: U64 = 0
    index: U64 = 0
    commit: U64 = 0
    reject: bool = False
    hint: U64 = 0
    ctx: str = ""
    entries: list[WireEntry] = []


class Presence(Struct, tag="node", tag_field="t", frozen=True):
    """Retained on kvs/<c>/nodes/<id>; the broker publishes the will (online=False)."""
    node: Name
    addr: str
    online: bool
    boot: str = ""     # random id of the process start: tells a stale will from a live server
    cid: str = ""
    term: U64 = 0
    applied: U64 = 0
    role: str = ""


class Join(Struct, tag="join", tag_field="t", frozen=True):
    """A server asking the leader to be added (as a learner) to cluster ``cid``."""
    node: Name
    addr: str
    boot: str
    cid: str
    ts: Time


_encoder = msgspec.json.Encoder()
# one decoder for every top-level document: inside a union the tag ``t`` is
# required (a lone tagged Struct would accept a document without it)
_doc_decoder = msgspec.json.Decoder(Union[RaftDoc, Presence, Join])
_entry_decoder = msgspec.json.Decoder(WireEntry)
_object_decoder = msgspec.json.Decoder(dict[str, Any])

# what a malformed payload can raise inside msgspec: invalid documents,
# invalid UTF-8 inside strings, nesting beyond the recursion limit
_DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)


def _decode(decoder: msgspec.json.Decoder, payload: Any, what: str, want: type = object) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) > MAX_DOC_BYTES:
        raise BadMessage(f"{what}: payload missing or too large")
    try:
        doc = decoder.decode(payload)
    except _DECODE_ERRORS as e:
        raise BadMessage(f"{what}: {type(e).__name__}: {e}") from None
    if not isinstance(doc, want):
        raise BadMessage(f"{what} expected, got a {type(doc).__name__} document")
    return doc


def _entry(term: int, index: int, kind: str, raw: Raw) -> Entry:
    try:
        data = _DATA_DECODERS[kind].decode(raw)
    except _DECODE_ERRORS as e:
        raise BadMessage(f"entry {index} ({kind}) data: {e}") from None
    # plain dicts/lists as the proposer built them; keys in field order, "op" first
    return Entry(term, index, kind, msgspec.to_builtins(data), len(raw))


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def encode(doc: Any) -> bytes:
    """Any JSON-able document (state transfer header and chunks)."""
    return _encoder.encode(doc)


def decode_object(payload: bytes) -> dict:
    """Any JSON object within the size limit (state transfer header and chunks)."""
    return _decode(_object_decoder, payload, "object")


def encode_entries(entries) -> msgspec.Raw:
    """Entries encoded once, to be sent to several followers (encode_raft's ``entries``)."""
    return msgspec.Raw(_encoder.encode([(e.term, e.index, e.kind, e.data) for e in entries]))


def encode_raft(cid: str, m: Message, entries: msgspec.Raw | None = None) -> bytes:
    return _encoder.encode(RaftDoc(
        cid, m.type, m.frm, m.to, m.term, m.log_term, m.index, m.commit, m.reject, m.hint,
        m.ctx, entries if entries is not None else
        [(e.term, e.index, e.kind, e.data) for e in m.entries]))


def decode_raft(payload: bytes) -> tuple[str, Message]:
    """(cluster id, Message); entry data comes back as plain dicts/lists."""
    d = _decode(_doc_decoder, payload, "raft message", RaftDoc)
    entries = tuple(_entry(*e) for e in d.entries)
    return d.cid, Message(d.type, d.frm, d.to, d.term, d.log_term, d.index, entries,
                          d.commit, d.reject, d.hint, d.ctx)


def check_entry(e: Entry) -> None:
    """Raise BadMessage unless ``e.data`` has its kind's shape.  A leader must
    not append what its followers would refuse to decode (they would stall)."""
    if e.kind not in _DATA_TYPES:
        raise BadMessage(f"unknown entry kind {e.kind!r}")
    try:
        msgspec.convert(e.data, _DATA_TYPES[e.kind])
    except _DECODE_ERRORS as ex:
        raise BadMessage(f"entry {e.index} ({e.kind}) data: {ex}") from None


def encode_entry(e: Entry) -> bytes:
    """One entry as ``[term, index, kind, data]`` (the WAL's record)."""
    return _encoder.encode((e.term, e.index, e.kind, e.data))


def decode_entry(payload: bytes) -> Entry:
    return _entry(*_decode(_entry_decoder, payload, "entry"))


def presence_doc(node: str, addr: str, online: bool, boot: str = "", cid: str = "",
                 term: int = 0, applied: int = 0, role: str = "") -> bytes:
    return _encoder.encode(Presence(node, addr, online, boot, cid, term, applied, role))


def decode_presence(payload: bytes) -> Presence:
    return _decode(_doc_decoder, payload, "presence", Presence)


def join_doc(node: str, addr: str, boot: str, cid: str, ts: float) -> bytes:
    return _encoder.encode(Join(node, addr, boot, cid, ts))


def decode_join(payload: bytes) -> Join:
    return _decode(_doc_decoder, payload, "join request", Join)
