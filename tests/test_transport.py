"""MqttTransport against a real Mosquitto: delivery, hostile messages, broker
restarts and the receive-path watchdog, all on one asyncio loop."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import time
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from kvs_cluster import HOST, Broker, free_port
from kvs_common.keys import derive_key
from server.transport import (MAC_PROPERTY, BrokerConfig, MqttTransport, _authentic,
                              mac_key, message_mac)

pytestmark = pytest.mark.integration

SECRET = b"cluster-secret"


class Inbox:
    def __init__(self):
        self.msgs: list[tuple[str, bytes]] = []
        self.conn: list[bool] = []

    def on_message(self, topic: str, payload: bytes) -> None:
        self.msgs.append((topic, payload))

    def on_connection(self, up: bool) -> None:
        self.conn.append(up)

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in self.msgs if t == topic]


async def until(pred, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def transport(port: int, name: str, inbox: Inbox, secret: bytes | None = None,
              keepalive: int = 10, **kw) -> MqttTransport:
    cfg = BrokerConfig(host=HOST, port=port, secret=secret, keepalive=keepalive)
    return MqttTransport(cfg, name, inbox.on_message, inbox.on_connection, **kw)


async def started(t: MqttTransport) -> MqttTransport:
    t.start()
    await until(lambda: t.connected, "transport connected")
    return t


async def heard(pub: MqttTransport, inbox: Inbox, topic: str) -> None:
    """Publish probes until the subscriber hears one (its SUBSCRIBE may not be
    through the broker yet), then forget them."""
    n = 0
    deadline = time.monotonic() + 10
    while not any(p.startswith(b"probe") for p in inbox.payloads(topic)):
        assert time.monotonic() < deadline, f"no probe on {topic} came through"
        n += 1
        pub.publish(topic, b"probe %d" % n)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)   # let probes in flight land before they are forgotten
    inbox.msgs[:] = [(t, p) for t, p in inbox.msgs if not p.startswith(b"probe")]


def raw_client(port: int) -> mqtt.Client:
    """A plain threaded paho client for publishing whatever a stranger might."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{os.urandom(4).hex()}",
                    protocol=mqtt.MQTTv5)
    c.connect(HOST, port)
    c.loop_start()
    return c


async def raw_publish(c: mqtt.Client, topic: str, payload: bytes, user_props=(),
                      retain: bool = False) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if user_props:
        props.UserProperty = list(user_props)
    info = c.publish(topic, payload, qos=1, retain=retain, properties=props)
    await until(info.is_published, f"raw publish on {topic}")


@pytest.fixture
def broker(tmp_path):
    b = Broker.start(workdir=tmp_path / "broker")
    yield b
    try:
        os.kill(b.pid, signal.SIGCONT)   # in case a test left it stopped
    except (ProcessLookupError, TypeError):
        pass
    b.kill()


# ---------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "hmac"])
def test_two_transports_exchange_messages(broker, secret):
    async def main():
        ia, ib = Inbox(), Inbox()
        a = await started(transport(broker.port, "a", ia, secret))
        b = await started(transport(broker.port, "b", ib, secret))
        a.subscribe("t/x")                 # no-local: a never hears itself
        b.subscribe("t/x")
        await heard(a, ib, "t/x")
        await heard(b, ia, "t/x")
        ia.msgs.clear(), ib.msgs.clear()
        for i in range(50):
            assert a.publish("t/x", b"from a %d" % i)
        assert b.publish("t/x", b"from b", qos=1)
        await until(lambda: len(ib.payloads("t/x")) == 50 and ia.payloads("t/x"), "delivery")
        assert ib.payloads("t/x") == [b"from a %d" % i for i in range(50)]  # one publisher: order
        assert ia.payloads("t/x") == [b"from b"]
        assert (a.rejected, a.dropped, b.rejected, b.dropped) == (0, 0, 0, 0)
        b.unsubscribe("t/x")
        await a.stop()
        await b.stop()
        assert not a.connected and a.client.socket() is None
        assert not a.publish("t/x", b"late")          # not connected: False, nothing queued
        assert ia.conn == [True] and ib.conn == [True]  # stop() reports nothing

    asyncio.run(main())


def test_wrong_secret_is_rejected(broker):
    async def main():
        ia, ie = Inbox(), Inbox()
        a = await started(transport(broker.port, "a", ia, SECRET))
        evil = await started(transport(broker.port, "evil", ie, b"not-the-secret"))
        ok = await started(transport(broker.port, "ok", Inbox(), SECRET))
        a.subscribe("t/x")
        await heard(ok, ia, "t/x")
        assert evil.publish("t/x", b"forged")
        assert ok.publish("t/x", b"genuine")
        await until(lambda: ia.payloads("t/x") == [b"genuine"] and a.rejected == 1, "verdicts")
        for t in (a, evil, ok):
            await t.stop()

    asyncio.run(main())


def test_hostile_messages_are_rejected_and_delivery_goes_on(broker):
    topic, retained_topic = "t/h", "t/retained"

    async def main():
        raw = raw_client(broker.port)
        try:
            # waiting for us before we even subscribe: delivered on SUBSCRIBE, and again
            # after every reconnect
            await raw_publish(raw, retained_topic, b"\xff\xfe not utf-8",
                              [(MAC_PROPERTY, "\u00e9" * 64)], retain=True)
            inbox = Inbox()
            t = await started(transport(broker.port, "victim", inbox, SECRET))
            friend = await started(transport(broker.port, "friend", Inbox(), SECRET))
            t.subscribe(topic)
            t.subscribe(retained_topic)
            await heard(friend, inbox, topic)
            await until(lambda: t.rejected == 1, "retained forgery rejected")

            good = message_mac(SECRET, topic, b"payload")
            # keyed by the raw secret, as servers before HKDF did: not a valid MAC any more
            raw_key = hmac.new(SECRET, topic.encode() + b"\n" + b"payload", hashlib.sha256).hexdigest()
            hostile = [
                (b"payload", [(MAC_PROPERTY, "\u00e9" * 64)]),            # non-ASCII
                (b"payload", [(MAC_PROPERTY, "\u20ac" * 20)]),            # non-ASCII, odd length
                (b"payload", [(MAC_PROPERTY, good), (MAC_PROPERTY, good)]),  # two macs
                (b"payload", [(MAC_PROPERTY, "")]),                       # empty
                (b"payload", [(MAC_PROPERTY, "a" * 60_000)]),             # huge (strings stop at 64 KiB)
                (b"payload", []),                                         # missing
                (b"payload", [("x-other", "1"), ("kvs-MAC", good)]),      # unknown ones only
                (b"payload", [(MAC_PROPERTY, "0" * 64)]),                 # wrong
                (b"payload", [(MAC_PROPERTY, raw_key)]),                  # raw secret as key
                (b"\xff\xfe\x00 not utf-8", [(MAC_PROPERTY, good)]),      # mac of another payload
                (b"\xff\xfe\x00 not utf-8", []),
            ]
            for payload, props in hostile:
                await raw_publish(raw, topic, payload, props)
            # after all that, a genuine message still arrives
            assert friend.publish(topic, b"genuine")
            await until(lambda: inbox.payloads(topic) == [b"genuine"], "genuine message")
            assert t.rejected == 1 + len(hostile)
            assert t.dropped == 0 and t.connected
            assert inbox.conn == [True]

            # a genuine message carrying extra unknown properties is still genuine
            mac = message_mac(SECRET, topic, b"\xff also fine")
            await raw_publish(raw, topic, b"\xff also fine", [("x-other", "\u00e9"), (MAC_PROPERTY, mac)])
            await until(lambda: inbox.payloads(topic)[-1:] == [b"\xff also fine"], "signed raw")
            await t.stop()
            await friend.stop()
        finally:
            raw.disconnect()
            raw.loop_stop()

    asyncio.run(main())


def test_authentic_never_raises_on_hostile_properties():
    mac = message_mac(SECRET, "t", b"p")
    cases = {
        "non-ascii": [(MAC_PROPERTY, "\u00e9" * 64)], "two": [(MAC_PROPERTY, mac)] * 2,
        "empty": [(MAC_PROPERTY, "")], "huge": [(MAC_PROPERTY, "a" * 10**6)],
        "not-str": [(MAC_PROPERTY, b"\x00" * 64)], "bad-shape": [("only-one",)],
        "missing": [], "surrogate": [(MAC_PROPERTY, "\udcff" * 64)],
    }
    key = mac_key(SECRET)
    for name, props in cases.items():
        assert _authentic(key, "t", b"p", SimpleNamespace(UserProperty=props)) is False, name
    assert _authentic(key, "t", b"p", None) is False
    assert _authentic(key, "t", b"p", SimpleNamespace(UserProperty=[(MAC_PROPERTY, mac)]))
    # the raw secret is not the key
    assert not _authentic(SECRET, "t", b"p", SimpleNamespace(UserProperty=[(MAC_PROPERTY, mac)]))


def test_published_mac_is_keyed_by_the_derived_key(broker):
    """What goes on the wire: HMAC-SHA256 under HKDF(secret, "mqtt-mac"),
    computed here independently of the transport's helpers."""
    topic = "t/k"
    got: list[tuple[bytes, list]] = []

    async def main():
        raw = raw_client(broker.port)
        raw.on_message = lambda c, u, m: got.append((m.payload, list(m.properties.UserProperty)))
        try:
            info = raw.subscribe(topic, qos=1)
            assert info[0] == mqtt.MQTT_ERR_SUCCESS
            t = await started(transport(broker.port, "signer", Inbox(), SECRET))
            n = 0
            while not got:   # the raw SUBSCRIBE may not be through yet: retry
                assert n < 200, "the raw subscriber heard nothing"
                n += 1
                t.publish(topic, b"hello")
                await asyncio.sleep(0.05)
            await t.stop()
        finally:
            raw.disconnect()
            raw.loop_stop()
        payload, props = got[0]
        key = derive_key(SECRET, "mqtt-mac")
        assert key != SECRET and len(key) == 32
        want = hmac.new(key, topic.encode() + b"\n" + payload, hashlib.sha256).hexdigest()
        assert props == [(MAC_PROPERTY, want)]
        assert want != hmac.new(SECRET, topic.encode() + b"\n" + payload, hashlib.sha256).hexdigest()

    asyncio.run(main())


def test_handler_that_raises_does_not_stop_delivery(broker):
    async def main():
        got: list[bytes] = []

        def on_message(topic, payload):
            if payload == b"boom":
                raise RuntimeError("handler bug")
            got.append(payload)

        cfg = BrokerConfig(host=HOST, port=broker.port)
        t = MqttTransport(cfg, "h", on_message, lambda up: None)
        inbox = Inbox()
        probe = await started(transport(broker.port, "p", inbox))
        await started(t)
        t.subscribe("t/h")
        while not got:                 # probe until the subscription is through
            probe.publish("t/h", b"warm-up")
            await asyncio.sleep(0.05)
        for p in (b"boom", b"after 1", b"boom", b"after 2"):
            assert probe.publish("t/h", p)
        await until(lambda: got[-2:] == [b"after 1", b"after 2"], "delivery after a raise")
        assert t.dropped == 2 and t.connected
        await t.stop()
        await probe.stop()

    asyncio.run(main())


def test_paho_failing_mid_packet_means_a_new_connection(broker):
    """If paho itself raises while parsing (e.g. a property that is not UTF-8),
    its input state is unusable: the transport must start a new connection."""
    async def main():
        inbox, other = Inbox(), Inbox()
        t = await started(transport(broker.port, "t", inbox))
        p = await started(transport(broker.port, "p", other))
        t.subscribe("t/m")
        await heard(p, inbox, "t/m")
        real = t.client._packet_handle

        def broken_once():
            t.client._packet_handle = real
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        t.client._packet_handle = broken_once
        assert p.publish("t/m", b"poison")
        await until(lambda: inbox.conn == [True, False, True], "reconnect after the failure")
        assert t.dropped == 1
        await heard(p, inbox, "t/m")
        assert p.publish("t/m", b"after")
        await until(lambda: inbox.payloads("t/m") == [b"after"], "delivery on the new connection")
        await t.stop()
        await p.stop()

    asyncio.run(main())


def test_start_without_broker_then_broker_appears(tmp_path):
    port = free_port()

    async def main():
        inbox = Inbox()
        t = transport(port, "early", inbox)
        t.start()                              # refused: must not raise
        await asyncio.sleep(0.3)               # (not synchronisation: lets a few attempts fail)
        assert not t.connected and inbox.conn == []
        b = Broker.start(port=port, workdir=tmp_path / "late-broker")
        try:
            await until(lambda: t.connected, "connect once the broker is up", timeout=10)
            assert inbox.conn == [True]
            await t.stop()
        finally:
            b.kill()

    asyncio.run(main())


def test_reconnects_after_broker_restart(broker):
    async def main():
        ia, ib = Inbox(), Inbox()
        a = await started(transport(broker.port, "a", ia, SECRET))
        b = await started(transport(broker.port, "b", ib, SECRET))
        b.subscribe("t/r")
        await heard(a, ib, "t/r")
        broker.kill()
        await until(lambda: not a.connected and not b.connected, "loss noticed")
        assert not a.publish("t/r", b"while down")
        broker.restart()
        await until(lambda: a.connected and b.connected, "reconnected", timeout=15)
        await heard(a, ib, "t/r")              # the subscription was renewed
        assert a.publish("t/r", b"after restart")
        await until(lambda: ib.payloads("t/r") == [b"after restart"], "delivery after restart")
        assert ia.conn == [True, False, True] and ib.conn == [True, False, True]
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_watchdog_notices_a_silent_broker(broker, caplog):
    async def main():
        ia, ib = Inbox(), Inbox()
        # keepalive far above the watchdog: only the watchdog can notice in time
        a = await started(transport(broker.port, "a", ia, keepalive=60,
                                    watchdog_topic="kvs/c/ping/a",
                                    watchdog_interval=0.2, watchdog_timeout=1.0))
        b = await started(transport(broker.port, "b", ib, keepalive=60))
        a.subscribe("t/w")
        await heard(b, ia, "t/w")
        # pings flow and are not handed to on_message
        ping_rx = a._ping_rx_at
        await until(lambda: a._ping_rx_at > ping_rx, "a ping back")
        assert not any(t == "kvs/c/ping/a" for t, _ in ia.msgs)
        await asyncio.sleep(1.5)             # several timeouts' worth: no false alarm
        assert ia.conn == [True]

        os.kill(broker.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            await until(lambda: ia.conn == [True, False], "watchdog reports the loss", timeout=5)
            assert time.monotonic() - t0 < 4.0   # keepalive alone would take 60+ s
            assert not a.connected and not a.publish("t/w", b"x")
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await until(lambda: ia.conn == [True, False, True], "reconnect after the broker resumes",
                    timeout=15)
        await until(lambda: b.connected, "b still or again connected", timeout=15)
        await heard(b, ia, "t/w")            # a new socket, subscriptions renewed
        assert any("watchdog" in r.getMessage() for r in caplog.records)
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_stop_is_clean_no_will(broker):
    async def main():
        watcher = Inbox()
        w = await started(transport(broker.port, "w", watcher, SECRET))
        w.subscribe("nodes/+")
        t = await started(transport(broker.port, "n1", Inbox(), SECRET,
                                    will=("nodes/n1", b"offline")))
        await heard(t, watcher, "nodes/n1")
        assert t.publish("nodes/n1", b"bye", qos=1, retain=True)   # sent before the DISCONNECT
        await t.stop()
        assert t.client.socket() is None
        await until(lambda: watcher.payloads("nodes/n1") == [b"bye"], "last publish")
        # a fresh subscriber sees the retained "bye", not the will
        late = Inbox()
        l2 = await started(transport(broker.port, "late", late, SECRET))
        l2.subscribe("nodes/n1")
        await until(lambda: late.payloads("nodes/n1"), "retained presence")
        assert late.payloads("nodes/n1") == [b"bye"] and w.rejected == 0
        for x in (w, l2):
            await x.stop()

    asyncio.run(main())


def test_tls_and_broker_account(tmp_path):
    from kvs_cluster.security import Security, read_first_line
    sec = Security.ensure(tmp_path / "sec", tls=True, grpc_tls=False, token=False)
    b = Broker.start(workdir=tmp_path / "tls-broker", security=sec)

    def cfg(password: str) -> BrokerConfig:
        return BrokerConfig(host=HOST, port=b.port, username=sec.mqtt_username,
                            password=password, tls_ca=str(sec.tls_ca), secret=SECRET)

    async def main():
        ia, ib, bad = Inbox(), Inbox(), Inbox()
        pw = read_first_line(sec.mqtt_password_file)
        a = await started(MqttTransport(cfg(pw), "a", ia.on_message, ia.on_connection))
        b2 = await started(MqttTransport(cfg(pw), "b", ib.on_message, ib.on_connection))
        a.subscribe("kvs/t")
        await heard(b2, ia, "kvs/t")
        assert b2.publish("kvs/t", b"over tls " + b"y" * 100_000)   # several TLS records
        await until(lambda: ia.payloads("kvs/t") == [b"over tls " + b"y" * 100_000], "delivery")
        assert a.client.socket().version() is not None                  # really TLS
        # many small packets share a TLS record: bytes epoll cannot see must still be read
        for i in range(2000):
            assert b2.publish("kvs/t", b"%d" % i)
        await until(lambda: len(ia.payloads("kvs/t")) == 2001, "burst over tls")
        assert ia.payloads("kvs/t")[1:] == [b"%d" % i for i in range(2000)]
        wrong = MqttTransport(cfg("wrong"), "w", bad.on_message, bad.on_connection)
        wrong.start()
        await asyncio.sleep(0.5)           # (not synchronisation: a few refused attempts)
        assert not wrong.connected and bad.conn == []
        for t in (a, b2, wrong):
            await t.stop()

    try:
        asyncio.run(main())
    finally:
        b.kill()
