"""Integration tests: 3 real servers replicating through a real, default-config Mosquitto.

Issue 2's list: replication both ways, numbering after remove-all through
another server, batch RPCs as the Rust client sends them, error cases,
big / unicode values, concurrent inserts of the same keys through all three
servers, a >= 30,000-change burst, and garbage on the servers' MQTT topics.

All tests of this module share one cluster (``cluster3``); each test uses its
own key prefix.  The garbage test and the burst run last because they are the
most likely to disturb the cluster.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import paho.mqtt.client as mqtt
import pytest

from conftest import (assert_replicas_identical, kvs_pb2, stub, trailing, wait_in_step,
                      wait_until)
from server import codec
from server.raft.types import CONF, NORMAL, Entry, Message, MsgType

pytestmark = pytest.mark.integration

CV = kvs_pb2.ChaveValor
BLANK = ("", "", 0)


def CVer(k, versao=None):  # noqa: N802 - mirrors the message name
    return kvs_pb2.ChaveVersao(chave=k) if versao is None else kvs_pb2.ChaveVersao(chave=k, versao=versao)


def uid() -> str:
    return uuid.uuid4().hex[:8]


def wait_all(stubs, pred, what, timeout=20.0):
    """Wait until ``pred(stub)`` holds on every server."""
    for s in stubs:
        wait_until(lambda s=s: pred(s), timeout, f"{what} at {s.address}")


def wait_consulta(stubs, k, expected, ver=None, timeout=20.0):
    wait_all(stubs, lambda s: s.consulta(k, ver) == expected,
             f"Consulta({k!r}, {ver}) == {expected!r:.80}", timeout)


# ---------------------------------------------------------------------------
# replication basics
# ---------------------------------------------------------------------------
def test_insert_and_remove_replicate_both_ways(stubs3):
    a, b, c = stubs3
    p = f"rep-{uid()}-"
    k = p + "main"
    assert a.insere(k, "val-a1") == 1
    assert a.consulta(k) == (k, "val-a1", 1)           # read-your-writes on the same server
    wait_consulta(stubs3, k, (k, "val-a1", 1))
    assert b.insere(k, "val-b2") == 2
    assert b.consulta(k) == (k, "val-b2", 2)
    assert c.insere(k, "val-c3") == 3
    wait_consulta(stubs3, k, (k, "val-c3", 3))

    # remove exactly version 2 through c: everybody falls back to version 1 for Consulta(k, 2)
    assert c.remove(k, 2) == 2
    wait_consulta(stubs3, k, (k, "val-a1", 1), ver=2)
    for s in stubs3:
        assert s.consulta(k, 3) == (k, "val-c3", 3)
        assert s.consulta(k, 1) == (k, "val-a1", 1)
    # remove-all through a returns the highest version removed
    assert a.remove(k) == 3
    wait_consulta(stubs3, k, (k, "", 0))

    # every ordered pair (writer, remover) of distinct servers
    for i, w in enumerate(stubs3):
        for j, r in enumerate(stubs3):
            if i == j:
                continue
            kk = f"{p}pair-{i}{j}"
            assert w.insere(kk, f"from-{i}") == 1
            wait_consulta([r], kk, (kk, f"from-{i}", 1))
            assert r.remove(kk) == 1
            wait_consulta(stubs3, kk, (kk, "", 0))
            assert w.insere(kk, f"again-{i}") == 2, "numbering must continue after remove-all"
            wait_consulta(stubs3, kk, (kk, f"again-{i}", 2))

    wait_in_step(stubs3)
    state = assert_replicas_identical(stubs3, prefix=p)
    assert len(state["history"]) == 6      # the 6 pair keys are live, `main` has no live version
    assert state["history"][f"{p}pair-01"][0] == 2


def test_numbering_continues_after_remove_all_through_another_server(stubs3):
    a, b, c = stubs3
    k = f"num-{uid()}"
    for i in (1, 2, 3):
        assert a.insere(k, f"value-{i}") == i
    wait_consulta([b], k, (k, "value-3", 3))
    assert b.remove(k) == 3                         # remove-all: the highest removed
    wait_consulta(stubs3, k, (k, "", 0))
    assert c.remove(k) == -1                        # no live versions left
    for v in (1, 2, 3):
        assert c.consulta(k, v) == (k, "", 0)
    assert c.insere(k, "after-remove") == 4         # never reuses 1..3
    wait_consulta(stubs3, k, (k, "after-remove", 4))
    assert a.consulta(k, 3) == (k, "", 0)
    assert a.remove(k, 4) == 4                      # remove the top version exactly ...
    wait_consulta(stubs3, k, (k, "", 0))
    assert b.insere(k, "fifth") == 5                # ... and 4 is not reused either
    wait_consulta(stubs3, k, (k, "fifth", 5))
    for s in stubs3:
        h = s.history(k)
        assert h.max_version == 5
        assert [(v.versao, v.valor) for v in h.versions] == [(5, "fifth")]


# ---------------------------------------------------------------------------
# batch RPCs
# ---------------------------------------------------------------------------
def test_batch_rpcs_with_versao_zero_and_absent(stubs3):
    a, b, c = stubs3
    p = f"batch-{uid()}-"
    k1, k2, k3, unknown = p + "k1", p + "k2", p + "k3", p + "never"
    replies = list(a.kvs.InsereVarias(iter([
        CV(chave=k1, valor="one"), CV(chave=k2, valor="uno"), CV(chave=k1, valor="two"),
        CV(chave="xy", valor="bad-key"), CV(chave=k1, valor="no"), CV(chave=k1, valor="three"),
        CV(chave=k3, valor="tres"), CV(chave=k3, valor="quatro"),
    ]), timeout=30))
    assert [r.versao for r in replies] == [1, 1, 2, -1, -1, 3, 1, 2]
    wait_consulta([b, c], k3, (k3, "quatro", 2))
    wait_consulta([b, c], k1, (k1, "three", 3))

    answers = [(t.chave, t.valor, t.versao) for t in b.kvs.ConsultaVarias(iter([
        CVer(k1, 0),          # Rust client: versao=0 means "latest"
        CVer(k1),             # versao absent: latest
        CVer(k1, 2),
        CVer(k2, 0),
        CVer(unknown, 0),
        CVer(k1, -5),         # <= 0: latest
        CVer(k1, 1),
        CVer(k1, 99),         # greatest <= 99
        CVer("xy", 0),        # invalid key: blank
    ]), timeout=30)]
    assert answers == [(k1, "three", 3), (k1, "three", 3), (k1, "two", 2), (k2, "uno", 1),
                       (unknown, "", 0), (k1, "three", 3), (k1, "one", 1), (k1, "three", 3),
                       answers[8][:1] + ("", 0)]

    removed = [r.versao for r in c.kvs.RemoveVarias(iter([
        CVer(k1, 2),          # exactly version 2
        CVer(k2, 0),          # versao=0: remove every live version -> highest removed
        CVer(k1, 2),          # already gone
        CVer(unknown, 0),     # unknown key
        CVer(k1, 0),          # remove-all of {1, 3} -> 3
        CVer("ab", 0),        # invalid key
        CVer(k3),             # versao absent: remove-all -> 2
    ]), timeout=30)]
    assert removed == [2, 1, -1, -1, 3, -1, 2]
    for k in (k1, k2, k3):
        wait_consulta(stubs3, k, (k, "", 0))
    # numbering continues after a batch remove-all
    assert [r.versao for r in b.kvs.InsereVarias(iter([CV(chave=k1, valor="four")]), timeout=30)] == [4]
    wait_consulta(stubs3, k1, (k1, "four", 4))
    wait_in_step(stubs3)
    assert_replicas_identical(stubs3, prefix=p)


# ---------------------------------------------------------------------------
# error cases
# ---------------------------------------------------------------------------
def test_invalid_input_gives_minus_one_and_reason(stubs3):
    a, b, _ = stubs3
    good = f"inv-{uid()}"
    cases = [("ab", "valid-value"), (good, "ab"), ("", "valid-value"), (good, ""),
             ("🙂🙂", "valid-value"), (good, "é!")]   # length counts code points, not bytes
    for k, v in cases:
        resp, call = a.kvs.Insere.with_call(CV(chave=k, valor=v), timeout=10)
        assert resp.versao == -1, (k, v)
        reason = trailing(call).get("kvs-error")
        assert reason, f"Insere({k!r}, {v!r}): no kvs-error trailing metadata: {trailing(call)}"

    resp, call = a.kvs.Remove.with_call(CVer("ab"), timeout=10)
    assert resp.versao == -1 and trailing(call).get("kvs-error")
    resp, call = a.kvs.Remove.with_call(CVer("ab", 1), timeout=10)
    assert resp.versao == -1 and trailing(call).get("kvs-error")
    t, call = a.kvs.Consulta.with_call(CVer("ab"), timeout=10)
    assert (t.valor, t.versao) == ("", 0) and trailing(call).get("kvs-error")

    # nothing of the above was stored (good key never got a version anywhere)
    assert a.insere(good, "now-valid") == 1
    wait_consulta([b], good, (good, "now-valid", 1))
    assert not any(k in ("ab", "", "🙂🙂") for k, _, _ in a.snapshot(0))


def test_consulta_unknown_and_remove_missing_version(stubs3):
    a, b, _ = stubs3
    k, unknown = f"miss-{uid()}", f"unknown-{uid()}"
    assert a.consulta(unknown) == (unknown, "", 0)
    assert a.consulta(unknown, 5) == (unknown, "", 0)
    t, call = a.kvs.Consulta.with_call(CVer(unknown), timeout=10)
    assert (t.chave, t.valor, t.versao) == (unknown, "", 0)

    assert a.insere(k, "first") == 1
    assert a.insere(k, "second") == 2
    for ver in (3, 7, 2**31 - 1):
        resp, call = a.kvs.Remove.with_call(CVer(k, ver), timeout=10)
        assert resp.versao == -1, ver
        assert trailing(call).get("kvs-error"), f"Remove({k}, {ver}) = -1 without a reason"
    assert a.remove(unknown) == -1
    assert a.remove(unknown, 1) == -1
    assert a.remove(k, 1) == 1
    assert a.remove(k, 1) == -1                       # the same exact version twice
    assert a.consulta(k) == (k, "second", 2)          # state untouched by the failed removes
    assert a.consulta(k, 1) == (k, "", 0)
    wait_consulta([b], k, (k, "", 0), ver=1)
    assert b.consulta(k) == (k, "second", 2)


def test_snapshot_empty_store_and_by_version(solo):
    s = stub(solo.servers[0].address)
    assert s.snapshot(0) == [BLANK]                    # exactly one blank Tupla
    assert s.snapshot(5) == [BLANK]
    assert s.snapshot(-1) == [BLANK]
    assert s.insere("key-one", "v1-one") == 1
    assert s.insere("key-one", "v2-one") == 2
    assert s.insere("key-two", "v1-two") == 1
    assert sorted(s.snapshot(0)) == [("key-one", "v2-one", 2), ("key-two", "v1-two", 1)]
    assert sorted(s.snapshot(1)) == [("key-one", "v1-one", 1), ("key-two", "v1-two", 1)]
    assert s.remove("key-one", 1) == 1
    assert sorted(s.snapshot(1)) == [("key-two", "v1-two", 1)]   # nothing qualifies for key-one
    assert s.remove("key-two") == 1
    assert s.snapshot(1) == [BLANK]
    assert s.snapshot(0) == [("key-one", "v2-one", 2)]
    assert s.remove("key-one") == 2
    assert s.snapshot(0) == [BLANK]


def test_oversized_request_rejected_and_server_keeps_serving(stubs3, cluster3):
    a, b, _ = stubs3
    k = f"huge-{uid()}"
    big = "x" * (5 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as exc:
        a.kvs.Insere(CV(chave=k, valor=big), timeout=30)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
    with pytest.raises(grpc.RpcError) as exc:
        list(a.kvs.InsereVarias(iter([CV(chave=k, valor=big)]), timeout=30))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value
    assert cluster3.servers[0].alive()
    assert a.consulta(k) == (k, "", 0)                 # the big one was not stored
    assert a.insere(k, "small") == 1                   # and the server still serves
    wait_consulta([b], k, (k, "small", 1))


def test_one_mib_value_accepted_and_replicated(stubs3):
    a, b, c = stubs3
    k = f"mib-{uid()}"
    value = ("0123456789abcdef" * 65536)            # exactly 1 MiB
    value2 = ("ação🙂" * 70000)                     # ~1.3 MiB of UTF-8
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert len(value.encode()) == 1024 * 1024
    assert b.insere(k, value) == 1
    assert c.insere(k, value2) == 2

    def same(s, ver, expected):
        t = s.kvs.Consulta(CVer(k, ver), timeout=20)
        return t.versao == ver and t.valor == expected
    wait_all(stubs3, lambda s: same(s, 1, value), "1 MiB value (sha256 %s) at version 1" % digest[:12])
    wait_all(stubs3, lambda s: same(s, 2, value2), "1.3 MiB unicode value at version 2")
    snaps = [dict((t[0], t[1]) for t in s.snapshot(0)) for s in stubs3]
    assert all(sn.get(k) == value2 for sn in snaps)


def test_unicode_keys_and_values(stubs3):
    a, b, c = stubs3
    u = uid()
    pairs = {
        f"uni-{u}-chave-ação": "valor-ção",
        f"uni-{u}-日本語": "値です",
        f"uni-{u}-🙂🙂🙂": "🎉🎉🎉",
        f"uni-{u}-ключ": "значение",
        f"uni-{u}-e\u0301x": "combining\u0301",
        f"uni-{u}-nul\x00key": "nul\x00value",
        f"uni-{u}-quote\"\\/\n\t": "json-special\"\\\n",
    }
    for i, (k, v) in enumerate(pairs.items()):
        assert stubs3[i % 3].insere(k, v) == 1, repr(k)
    for k, v in pairs.items():
        wait_consulta(stubs3, k, (k, v, 1))
    for short in ("日本語", "🙂🙂🙂"):             # exactly 3 code points (9/12 bytes): valid
        ver = a.insere(short, short)
        assert ver >= 1
        wait_consulta(stubs3, short, (short, short, ver))
    wait_in_step(stubs3)
    state = assert_replicas_identical(stubs3, prefix=f"uni-{u}")
    assert sorted(state["history"]) == sorted(pairs)


# ---------------------------------------------------------------------------
# idempotent retries: a write tagged with a request id is applied once
# ---------------------------------------------------------------------------
def _rid(value: str | None = None):
    return (("kvs-request-id", value or uuid.uuid4().hex),)


def test_request_id_applies_a_write_once_through_any_server(stubs3):
    a, b, c = stubs3
    k = f"rid-{uid()}"
    first = _rid()
    # the first attempt, then "retries" of it through every server
    assert [s.kvs.Insere(CV(chave=k, valor="val-1"), metadata=first, timeout=10).versao
            for s in (a, b, c, a)] == [1, 1, 1, 1]
    # another request id is another write
    assert b.kvs.Insere(CV(chave=k, valor="val-2"), metadata=_rid(), timeout=10).versao == 2
    # the same id sent through all three servers at once: one version between them
    same = _rid()
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda s: s.kvs.Insere(CV(chave=k, valor="val-3"), metadata=same,
                                                   timeout=10).versao, (a, b, c)))
    assert got == [3, 3, 3], got
    wait_all(stubs3, lambda s: sorted(v.versao for v in s.history(k).versions) == [1, 2, 3],
             f"{k} has versions 1..3 only")

    # a Remove retried after it was applied answers what the first answered
    gone = _rid()
    assert a.kvs.Remove(CVer(k, 2), metadata=gone, timeout=10).versao == 2
    assert c.kvs.Remove(CVer(k, 2), metadata=gone, timeout=10).versao == 2
    # ... even though removing version 2 again (a new request) fails
    assert c.kvs.Remove(CVer(k, 2), metadata=_rid(), timeout=10).versao == -1

    # a stream's i-th change is "<id>.<i>": the whole stream retried through another
    # server gets the same versions and writes nothing twice
    ks = [f"{k}-s{i}" for i in range(3)]
    stream_id = _rid()
    once = [r.versao for r in a.kvs.InsereVarias(iter([CV(chave=x, valor="sss") for x in ks]),
                                                 metadata=stream_id, timeout=10)]
    again = [r.versao for r in b.kvs.InsereVarias(iter([CV(chave=x, valor="sss") for x in ks]),
                                                  metadata=stream_id, timeout=10)]
    assert once == again == [1, 1, 1]
    wait_all(stubs3, lambda s: all(s.history(x).max_version == 1 for x in ks),
             "stream keys written once")


def test_malformed_request_id_is_refused_and_writes_nothing(stubs3):
    a, b, _ = stubs3
    k = f"rid-bad-{uid()}"
    for bad in ("short", "x" * 65, "has space!", "dots.are.out"):
        resp, call = a.kvs.Insere.with_call(CV(chave=k, valor="val"), metadata=_rid(bad), timeout=10)
        assert resp.versao == -1, bad
        assert "kvs-request-id" in trailing(call).get("kvs-error", ""), trailing(call)
    replies, = [list(b.kvs.InsereVarias(iter([CV(chave=k, valor="val")] * 2),
                                        metadata=_rid("bad id"), timeout=10))]
    assert [r.versao for r in replies] == [-1, -1]
    assert a.insere(k, "plain-value") == 1  # nothing above was written


# ---------------------------------------------------------------------------
# concurrency: the same keys written through all three servers at once
# ---------------------------------------------------------------------------
def test_concurrent_inserts_same_keys_from_three_servers(stubs3):
    u = uid()
    keys = [f"conc-{u}-{i:02d}" for i in range(20)]
    per_client = 400                 # unary inserts per client, 32 in flight
    per_stream = 100                 # plus one InsereVarias stream per client
    records: list[tuple[str, int, str]] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [stub(s.address) for s in stubs3]    # fresh channels: one client per server

    def one(ci: int, i: int):
        s = clients[ci]
        k, v = keys[(i * 7 + ci) % len(keys)], f"c{ci}-u{i}-{u}"
        ver = s.insere(k, v)
        if ver < 1:
            with lock:
                errors.append(f"{s.address}: Insere({k}, {v}) = {ver}")
            return
        seen = s.consulta(k, ver)                      # read-your-writes, same server
        with lock:
            records.append((k, ver, v))
            if seen != (k, v, ver):
                errors.append(f"{s.address}: Consulta({k},{ver}) = {seen} right after Insere -> {ver}")

    def stream(ci: int):
        s = clients[ci]
        reqs = [(keys[(i * 3 + ci) % len(keys)], f"c{ci}-s{i}-{u}") for i in range(per_stream)]
        out = list(s.kvs.InsereVarias(iter(CV(chave=k, valor=v) for k, v in reqs), timeout=120))
        with lock:
            if len(out) != len(reqs):
                errors.append(f"{s.address}: {len(out)} replies for {len(reqs)} InsereVarias requests")
            for (k, v), r in zip(reqs, out):
                if r.versao < 1:
                    errors.append(f"{s.address}: InsereVarias({k}, {v}) = {r.versao}")
                else:
                    records.append((k, r.versao, v))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=3 * 32 + 3) as pool:
        futures = [pool.submit(stream, ci) for ci in range(3)]
        futures += [pool.submit(one, ci, i) for i in range(per_client) for ci in range(3)]
        for f in futures:
            f.result(timeout=180)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:10]
    assert len(records) == 3 * (per_client + per_stream)

    by_key: dict[str, dict[int, str]] = defaultdict(dict)
    for k, ver, v in records:
        assert ver not in by_key[k], f"{k}: version {ver} handed out twice ({by_key[k][ver]!r} and {v!r})"
        by_key[k][ver] = v
    written = Counter(k for k, _, _ in records)
    for k in keys:
        assert sorted(by_key[k]) == list(range(1, written[k] + 1)), f"{k}: versions not exactly 1..N"

    wait_in_step(stubs3, timeout=60)
    state = assert_replicas_identical(stubs3, prefix=f"conc-{u}")
    for k in keys:
        stored = {ver: val for ver, val, *_ in state["history"][k][1]}
        assert stored == by_key[k], f"{k}: stored values differ from what clients were told"
    print(f"{len(records)} concurrent inserts in {elapsed:.1f}s")


# ---------------------------------------------------------------------------
# garbage on the broker
# ---------------------------------------------------------------------------
BASE = "kvs/kvs"


def _publish_all(broker_port: int, messages: list[tuple[str, bytes, int, bool]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"garbage-{uid()}")
    client.max_inflight_messages_set(20)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=q, retain=r) for t, p, q, r in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "broker did not take a garbage message"
    finally:
        client.disconnect()
        client.loop_stop()


def _strip(state: dict, prefix: str) -> dict:
    """``state`` without the keys that start with ``prefix``."""
    return {
        # the blank Tupla of an empty store disappears once the markers exist
        "snapshot": [t for t in state["snapshot"] if t[0] and not t[0].startswith(prefix)],
        "snapshots": {v: [t for t in snap if t[0] and not t[0].startswith(prefix)]
                      for v, snap in state["snapshots"].items()},
        "history": {k: h for k, h in state["history"].items() if not k.startswith(prefix)},
        "consulta": [t for t in state.get("consulta", []) if not t[0].startswith(prefix)],
    }


def _cluster_view(st) -> tuple:
    """What garbage must not change: term, leader, cluster id, membership."""
    return (st.term, st.epoch, st.leader, st.cluster_id,
            sorted((m.node_id, m.role) for m in st.members))


def _check_unharmed(cluster3, stubs3, before: dict, view: tuple, u: str, marker: str):
    for srv in cluster3.servers:
        assert srv.alive(), f"server {srv.address} died (exit {srv.returncode}):\n{srv.log_tail()}"
    # fresh writes through every server still replicate, and everybody gets back in step.
    # A write may fail (-1 + reason) while the flood is being digested; it must work again
    # within the deadline.
    failures: list[str] = []
    for i, s in enumerate(stubs3):
        k, v = f"{marker}-{i}", f"marker-{i}"

        def write(s=s, k=k, v=v):
            resp, call = s.kvs.Insere.with_call(CV(chave=k, valor=v), timeout=30)
            if resp.versao < 1:
                failures.append(f"{s.address}: -1 ({trailing(call).get('kvs-error')})")
            return resp.versao if resp.versao >= 1 else None
        ver = wait_until(write, 60, f"a write through {s.address} after the hostile messages")
        wait_consulta(stubs3, k, (k, v, ver), timeout=60)
    if failures:
        print(f"writes refused while the garbage was digested: {failures}")
    sts = wait_in_step(stubs3, timeout=60, what="in step after the hostile messages")
    assert all(st.applied_index < 2**40 and st.commit_index < 2**40 for st in sts), \
        [(st.applied_index, st.commit_index) for st in sts]
    views = [_cluster_view(st) for st in sts]
    assert views == [view] * len(sts), f"term/leader/membership changed: {view} -> {views}"
    after = assert_replicas_identical(stubs3)
    assert _strip(after, marker) == _strip(before, marker), "garbage changed the replicated state"
    for s in stubs3:
        assert s.consulta(f"evil-{u}") == (f"evil-{u}", "", 0)


def _evil_data(u: str, leader: str, n: int = 1, value: str = "evil-value") -> dict:
    """A NORMAL entry's data: ``n`` puts of the key evil-<u>."""
    return {"ts": time.time(), "items": [
        {"op": "put", "id": f"evil-{u}-{i}", "k": f"evil-{u}", "v": value, "node": leader}
        for i in range(n)]}


def _raft_garbage(cid: str, leader: str, to: str, term: int, commit: int, u: str) -> list[bytes]:
    """Raft-shaped documents to ``to`` that are each malformed in one way (wrong
    types, negative / beyond-int64 numbers, unknown types / kinds / ops, NaN,
    extra fields inside entry data), though claiming the real cluster and leader."""
    put = {"op": "put", "id": f"evil-{u}", "k": f"evil-{u}", "v": "evil-value", "node": leader}

    def doc(**kw) -> bytes:
        return json.dumps({"t": "raft", "cid": cid, "type": "app", "frm": leader, "to": to,
                           "term": term, "log_term": term, "index": commit,
                           "commit": commit + 1, **kw}).encode()

    def entry(*e) -> bytes:
        return doc(entries=[list(e)])

    ok = {"ts": 1.0, "items": [put]}
    return [
        b'{"t": "raft"}', json.dumps({"t": "raft", "cid": cid}).encode(),
        doc(type="app2"), doc(type=5), doc(type=None), doc(type="APP"),
        doc(frm=""), doc(frm=5), doc(to=None), doc(cid=5), doc(cid=None),
        doc(term=-1), doc(term=2**63), doc(term=2**64 + 1), doc(term="1"), doc(term=1.5),
        doc(term=True), doc(index=-5), doc(commit=2**70), doc(log_term=[]), doc(hint=-1),
        doc(reject="yes"), doc(ctx=7), doc(entries="no"), doc(entries={"0": ok}),
        entry(term, commit + 1, "weird", None), entry(term, commit + 1, "normal"),
        entry(-1, commit + 1, "normal", ok), entry(term, 2**64, "normal", ok),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": []}),
        entry(term, commit + 1, "normal", {"ts": -1.0, "items": [put]}),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": [dict(put, op="drop_all")]}),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": [dict(put, extra=1)]}),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": [{"op": "put", "id": 1, "k": 5,
                                                                 "v": None, "node": leader}]}),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": [
            {"op": "del", "id": "x", "k": "kkk", "ver": 2**40, "node": leader}]}),
        entry(term, commit + 1, "normal", {"ts": 1.0, "items": [put], "extra": True}),
        entry(term, commit + 1, "conf", {"op": "make_leader", "node": f"intruder-{u}", "addr": ""}),
        entry(term, commit + 1, "conf", {"op": "add_learner", "node": f"intruder-{u}"}),
        entry(term, commit + 1, "conf", {"op": "bootstrap", "voters": []}),
        entry(term, commit + 1, "noop", {}),
        doc(type="prop", entries=[[0, 0, "normal", {"ts": "now", "items": [put]}]]),
        doc(type="hb", commit=-1), doc(type="vote", term=2**63, index=2**64),
        # NaN is not JSON; invalid UTF-8 inside a string; an int beyond Python's digit limit
        doc(entries=[[term, commit + 1, "normal", ok]])
        .replace(b'"ts":1.0', b'"ts":NaN').replace(b'"ts": 1.0', b'"ts": NaN'),
        doc().replace(b'"frm": "', b'"frm": "\xff\xfe'),
        doc().replace(f'"term": {term},'.encode(), b'"term": ' + b"9" * 5000 + b","),
        b'{"t": "raft", "cid": "' + cid.encode() + b'", "entries": ' + b"[" * 50000
        + b"]" * 50000 + b"}",
    ]


def test_garbage_on_broker_topics_changes_nothing(cluster3, stubs3):
    """Malformed documents on every topic the servers use (Raft messages to each
    server, join requests, presence, the watchdog pings), on the old topics and on
    random ones: nothing changes, and writes through every server still work.

    Plain mode (no cluster secret): a well-formed message that claims to come
    from a member is unauthenticated and can disturb the cluster (that is what
    the cluster secret is for, see test_security.py), so every document here
    that claims a member is malformed, and the well-formed ones come from an
    intruder, another cluster or a node id that is no member."""
    u = uid()
    sts = wait_in_step(stubs3)
    before = assert_replicas_identical(stubs3)
    nodes = [st.node_id for st in sts]
    cid, term, leader, commit = sts[0].cluster_id, sts[0].term, sts[0].leader, sts[0].commit_index
    view = _cluster_view(sts[0])
    assert cid and leader and term >= 1
    intruder = f"intruder-{u}"
    evil_put = {"id": f"evil-{u}", "op": "put", "k": f"evil-{u}", "v": "evil-value", "node": leader}
    common = [
        b"", b"\x00\xff\xfe\xfd garbage", b"not json at all", b"{", b"[]", b"null", b"42", b'"str"',
        b"{}", b'{"t": "raft", "frm": "\xff\xfe"}',          # invalid UTF-8 inside JSON
        b"[" * 50000 + b"]" * 50000,                          # deeply nested (RecursionError bait)
        json.dumps({"t": "unknown-type", "payload": list(range(100))}).encode(),
        json.dumps({"node": nodes[0], "items": [evil_put]}).encode(),   # no type field
        # documents of the replaced protocol
        json.dumps({"t": "batch", "epoch": term, "leader": leader, "first": commit + 1,
                    "prev": "0" * 32, "ts": 1.0, "items": [evil_put]}).encode(),
        json.dumps({"t": "propose", "node": nodes[0], "items": [evil_put]}).encode(),
        json.dumps({"t": "hb", "epoch": term, "leader": leader, "last": 2**64 + 7,
                    "hash": "0"}).encode(),
    ]
    join_ok = {"t": "join", "node": intruder, "addr": "127.0.0.1:1", "boot": "b00t", "cid": cid,
               "ts": 1.0}
    joins = [json.dumps(j).encode() for j in (
        {"t": "join"}, dict(join_ok, node=""), dict(join_ok, cid=5), dict(join_ok, ts=-1.0),
        dict(join_ok, ts="now"), dict(join_ok, addr=None), dict(join_ok, boot=[]),
        dict(join_ok, t="node"), {k: v for k, v in join_ok.items() if k != "cid"},
        dict(join_ok, cid="another-cluster"),      # well-formed, for another cluster
    )] + [json.dumps(join_ok).encode().replace(b'"ts": 1.0', b'"ts": NaN')]
    node_ok = {"t": "node", "node": nodes[1], "addr": "127.0.0.1:1", "online": False,
               "boot": "b00t", "cid": cid, "term": term + 5, "applied": commit, "role": "leader"}
    presences = [json.dumps(p).encode() for p in (
        {"t": "node"}, dict(node_ok, node=""), dict(node_ok, online="yes"), dict(node_ok, term=-1),
        dict(node_ok, applied="x"), dict(node_ok, addr=5), dict(node_ok, term=2**64),
        dict(node_ok, t="join"), dict(node_ok, node=intruder, online=True),  # not its own topic
    )]
    # each server's Raft topic first: its log then shows (the first few) refusals
    messages = [(f"{BASE}/raft/{n}", d, qos, False) for n in nodes
                for d in common + _raft_garbage(cid, leader, n, term, commit, u) for qos in (0, 1)]
    for n in nodes:
        for d in common + presences:
            messages += [(f"{BASE}/nodes/{n}", d, qos, False) for qos in (0, 1)]
        messages += [(f"{BASE}/ping/{n}", d, 1, False) for d in common]
    others = [f"{BASE}/raft/{intruder}", f"{BASE}/raft", f"{BASE}/raft/", f"{BASE}/nodes/{intruder}",
              f"{BASE}/propose", f"{BASE}/log", f"{BASE}/hb", f"{BASE}/garbage/{u}/x",
              f"{BASE}/join/extra", BASE, f"{BASE}/"]
    messages += [(t, d, qos, False) for t in [f"{BASE}/join"] + others
                 for d in common + joins + _raft_garbage(cid, leader, nodes[0], term, commit, u)
                 for qos in (0, 1)]
    two_mb_binary = bytes(range(256)) * (2 * 1024 * 1024 // 256)
    two_mb_json = json.dumps({"t": "raft", "cid": cid, "type": "app", "frm": leader, "to": nodes[0],
                              "term": "huge", "index": commit, "log_term": term,
                              "commit": commit + 2000, "entries": [
                                  [term, commit + 1 + i, "normal", _evil_data(u, leader, 1, "x" * 1000)]
                                  for i in range(2000)]}).encode()
    assert len(two_mb_binary) >= 2 * 1024 * 1024 and len(two_mb_json) >= 2 * 1000 * 1000
    big_topics = [f"{BASE}/raft/{n}" for n in nodes] + [f"{BASE}/join", f"{BASE}/nodes/{nodes[0]}",
                                                        f"{BASE}/ping/{nodes[0]}", f"{BASE}/log"]
    messages += [(t, d, 1, False) for t in big_topics for d in (two_mb_binary, two_mb_json)]
    retained = [f"{BASE}/garbage/{u}/retained", f"{BASE}/nodes/{intruder}"]
    messages += [(t, d, 1, True) for t in retained for d in (b"\xff retained garbage", b"{}")]
    # a well-formed presence of a stranger: no member, but it stays on the broker
    messages += [(f"{BASE}/nodes/{intruder}",
                  json.dumps(dict(node_ok, node=intruder, online=True)).encode(), 1, True)]
    try:
        _publish_all(cluster3.broker.port, messages)
        _check_unharmed(cluster3, stubs3, before, view, u, marker=f"after-garbage-{u}")
        # not vacuous: the garbage reached every server's Raft decoder (and was refused)
        for srv in cluster3.servers:
            assert re.search(r"WARNING .*raft message", srv.log_text()), srv.log_tail()
    finally:
        _publish_all(cluster3.broker.port, [(t, b"", 1, True) for t in retained])   # clear retained


def test_forged_log_batches_with_absurd_positions_change_nothing(cluster3, stubs3):
    """Well-formed Raft messages from an intruder (a node id that is no member)
    with absurd terms and indexes (2**62, 2**63-1), and with plausible ones (an
    APP at the current term that fits every follower's log exactly, a proposal,
    a membership change): nothing changes, the term stays the same.  Plus the
    same absurd numbers beyond int64, which the codec must refuse.

    Plain mode: only intruder ids, see the garbage test above."""
    u = uid()
    sts = wait_in_step(stubs3)
    before = assert_replicas_identical(stubs3)
    nodes = [st.node_id for st in sts]
    cid, term, leader, commit = sts[0].cluster_id, sts[0].term, sts[0].leader, sts[0].commit_index
    view = _cluster_view(sts[0])
    intruder = f"intruder-{u}"
    big = 2**62
    top = 2**63 - 1

    def evil(t: int, i: int, n: int = 1, value: str = "evil-value") -> Entry:
        return Entry(t, i, NORMAL, _evil_data(u, leader, n, value))

    def forged(to: str) -> list[Message]:
        def m(kind: MsgType, **kw) -> Message:
            return Message(kind, intruder, to, **kw)
        conf = Entry(term, commit + 1, CONF, {"op": "add_learner", "node": intruder,
                                               "addr": "127.0.0.1:1"})
        return [
            m(MsgType.APP, term=big, index=big, log_term=big, commit=top, entries=(evil(big, big + 1),)),
            m(MsgType.APP, term=top, index=commit, log_term=term, commit=top,
              entries=(evil(top, commit + 1),)),
            # the current term, and exactly where every follower's log ends
            m(MsgType.APP, term=term, index=commit, log_term=term, commit=commit + 1,
              entries=(evil(term, commit + 1),)),
            m(MsgType.APP, term=term, index=top - 1, log_term=term, commit=top,
              entries=(evil(term, top),)),
            m(MsgType.APP, term=term, index=commit, log_term=term, commit=commit + 1, entries=(conf,)),
            m(MsgType.HB, term=term, commit=top), m(MsgType.HB, term=big, commit=big),
            m(MsgType.VOTE, term=big, index=top, log_term=top),
            m(MsgType.VOTE, term=term + 1, index=commit, log_term=term),
            m(MsgType.PREVOTE, term=top, index=top, log_term=top),
            m(MsgType.SNAP, term=term, index=big, log_term=term),
            m(MsgType.SNAP, term=top, index=top, log_term=top),
            m(MsgType.APP_RESP, term=term, index=big), m(MsgType.APP_RESP, term=top, index=top,
                                                            reject=True, hint=top),
            m(MsgType.HB_RESP, term=term, ctx="x"), m(MsgType.VOTE_RESP, term=term + 1),
            m(MsgType.PREVOTE_RESP, term=big),
            m(MsgType.PROP, entries=(evil(0, 0, 3),)), m(MsgType.PROP, entries=(conf,)),
            m(MsgType.READ, ctx=f"read-{u}"), m(MsgType.READ_RESP, index=top, ctx=f"read-{u}"),
        ]

    def beyond_int64(to: str) -> list[bytes]:
        base = {"t": "raft", "cid": cid, "type": "app", "frm": intruder, "to": to}
        return [json.dumps(dict(base, **kw)).encode() for kw in (
            {"term": 2**63, "index": commit, "log_term": term},
            {"term": term, "index": 2**63, "commit": 2**64},
            {"type": "vote", "term": 2**64, "index": 2**64, "log_term": 2**64},
            {"type": "hb", "term": term, "commit": 2**63},
        )]

    messages = []
    for n in nodes:
        docs = [codec.encode_raft(cid, m) for m in forged(n)] + beyond_int64(n)
        # two megabytes of well-formed entries that fit the followers' logs
        docs.append(codec.encode_raft(cid, Message(
            MsgType.APP, intruder, n, term=term, index=commit, log_term=term,
            commit=commit + 2000, entries=tuple(evil(term, commit + 1 + i, 1, "x" * 1000)
                                                for i in range(2000)))))
        messages += [(f"{BASE}/raft/{n}", d, 1, False) for d in docs]
    for m in forged(nodes[0]):   # a well-formed message: only membership can stop it
        assert codec.decode_raft(codec.encode_raft(cid, m))[1].frm == intruder
    old = [f"{BASE}/log", f"{BASE}/hb", f"{BASE}/propose"]
    messages += [(t, codec.encode_raft(cid, m), 1, False) for t in old for m in forged(nodes[0])]
    _publish_all(cluster3.broker.port, messages)
    _check_unharmed(cluster3, stubs3, before, view, u, marker=f"after-forged-{u}")


# ---------------------------------------------------------------------------
# burst through the default-config broker (1000-message queue, silent drops)
# ---------------------------------------------------------------------------
BURST_KEYS = 600
STREAMS_PER_SERVER = 4
PER_STREAM = 2500            # 3 servers x 4 streams x 2500 = 30,000 inserts
REMOVES_PER_SERVER = 200     # + 600 exact-version removes, concurrently


def test_burst_30k_changes_replicas_identical(cluster3, stubs3):
    u = uid()
    p = f"burst-{u}-"
    keys = [f"{p}{i:04d}" for i in range(BURST_KEYS)]
    inserted: list[tuple[str, int, str]] = []
    removes: list[tuple[str, int, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def insert_stream(si: int, j: int):
        s = stub(stubs3[si].address)
        n = (si * STREAMS_PER_SERVER + j)
        reqs = [(keys[(n * 7919 + i) % BURST_KEYS], f"s{si}-{j}-{i}") for i in range(PER_STREAM)]
        out = list(s.kvs.InsereVarias(iter(CV(chave=k, valor=v) for k, v in reqs), timeout=240))
        with lock:
            if len(out) != len(reqs):
                errors.append(f"{s.address}: {len(out)} replies for {len(reqs)} requests")
            for (k, v), r in zip(reqs, out):
                if r.versao < 1:
                    errors.append(f"{s.address}: InsereVarias({k}, {v}) -> {r.versao}")
                else:
                    inserted.append((k, r.versao, v))

    def remove_stream(si: int):
        s = stub(stubs3[si].address)
        reqs = [(keys[(si * 101 + i * 3) % BURST_KEYS], 1 + (i % 3) + si * 3) for i in range(REMOVES_PER_SERVER)]
        out = list(s.kvs.RemoveVarias(iter(CVer(k, v) for k, v in reqs), timeout=240))
        with lock:
            if len(out) != len(reqs):
                errors.append(f"{s.address}: {len(out)} replies for {len(reqs)} RemoveVarias requests")
            removes.extend((k, v, r.versao) for (k, v), r in zip(reqs, out))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=3 * STREAMS_PER_SERVER + 3) as pool:
        futures = [pool.submit(insert_stream, si, j) for si in range(3) for j in range(STREAMS_PER_SERVER)]
        futures += [pool.submit(remove_stream, si) for si in range(3)]
        for f in futures:
            f.result(timeout=260)
    write_time = time.monotonic() - t0
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:5]}"
    total = 3 * STREAMS_PER_SERVER * PER_STREAM
    assert len(inserted) == total and total >= 30_000

    # versions handed out: exactly 1..N per key, no duplicates
    by_key: dict[str, dict[int, str]] = defaultdict(dict)
    for k, ver, v in inserted:
        assert ver not in by_key[k], f"{k}: version {ver} handed out twice"
        by_key[k][ver] = v
    counts = Counter(k for k, _, _ in inserted)
    for k in keys:
        assert sorted(by_key[k]) == list(range(1, counts[k] + 1)), f"{k}: versions not exactly 1..N"
    removed = set()
    for k, ver, r in removes:
        assert r in (ver, -1), f"Remove({k}, {ver}) -> {r}"
        if r == ver:
            assert (k, ver) not in removed, f"({k}, {ver}) removed twice"
            removed.add((k, ver))

    sts = wait_in_step(stubs3, timeout=120, what="in step after the burst")
    settle_time = time.monotonic() - t0 - write_time
    for srv in cluster3.servers:
        assert srv.alive(), f"{srv.address} died during the burst:\n{srv.log_tail()}"
    t1 = time.monotonic()
    # History is the complete data of every key; Consulta is checked on a 5,000-pair sample
    # (all ~30,000 pairs x 3 servers would take a minute on 2 cores)
    state = assert_replicas_identical(stubs3, prefix=p, consult_all=False, sample=5000,
                                      snapshot_versions=(1, 2, 5, 10, 20, 40, 60))
    compare_time = time.monotonic() - t1
    for k in keys:
        stored = {ver: val for ver, val, *_ in state["history"].get(k, (0, []))[1]}
        expected = {ver: val for ver, val in by_key[k].items() if (k, ver) not in removed}
        assert stored == expected, f"{k}: replicated history differs from what clients were told"
        assert state["history"][k][0] == counts[k]
    print(f"burst: {total} inserts + {len(removes)} removes ({len(removed)} hit) written in "
          f"{write_time:.1f}s, in step {settle_time:.1f}s later at seq {sts[0].applied_seq}, "
          f"replicas compared in {compare_time:.1f}s")
