"""The MQTT connection: paho-mqtt 2.x with automatic reconnect.

Callbacks run on paho's network thread and must stay cheap: the log hands
payloads to its own thread, so Mosquitto never has to queue (and, past its
default 1000 messages, silently drop) because we read slowly.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

_SUB_OPTIONS = SubscribeOptions(qos=1, noLocal=True)


@dataclass
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None        # CA file: enables TLS to the broker
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 10              # seconds; a silent connection is dropped after ~1.5x this
    secret: bytes | None = None      # cluster secret: every message carries an HMAC


MAC_PROPERTY = "kvs-mac"


def message_mac(secret: bytes, topic: str, payload: bytes) -> str:
    """HMAC-SHA256 over topic and payload (binding the topic stops a valid
    document from being replayed on another topic)."""
    return hmac.new(secret, topic.encode() + b"\n" + payload, hashlib.sha256).hexdigest()


class MqttTransport:
    def __init__(self, cfg: BrokerConfig, client_id: str,
                 on_message: Callable[[str, bytes], None],
                 on_connection: Callable[[bool], None],
                 on_published: Callable[[int], None] | None = None,
                 will: tuple[str, bytes] | None = None):
        self.cfg = cfg
        self._on_message = on_message
        self._on_connection = on_connection
        self._on_published = on_published
        self._subs: set[str] = set()
        self.rejected = 0  # messages dropped for a missing or wrong HMAC
        self._lock = threading.Lock()
        self.connected = False
        # MQTT 5 for the no-local subscription option: a server does not get
        # its own log batches echoed back.
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(64)
        c.reconnect_delay_set(min_delay=0.1, max_delay=2)  # backoff between attempts
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls_ca:
            c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key,
                      cert_reqs=ssl.CERT_REQUIRED)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True,
                       properties=self._signed(will[0], will[1], will=True))
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        self.client = c

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                  clean_start=True)
        self.client.loop_start()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # -- subscriptions survive reconnects (clean session) --------------------
    def subscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.add(topic)
            if self.connected:
                self.client.subscribe(topic, options=_SUB_OPTIONS)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.discard(topic)
            if self.connected:
                self.client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        """Returns paho's MessageInfo, or None when not connected (we never let
        paho queue changes for a later reconnect: they would be stale)."""
        if not self.connected:
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                   properties=self._signed(topic, payload))
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return info

    # -- paho callbacks (network thread) ---------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        sock = client.socket()
        if sock is not None:
            # paho leaves Nagle on: small batches would wait for the previous
            # segment's ACK (~40-90 ms per write through a follower).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        with self._lock:
            self.connected = True
            for t in self._subs:
                client.subscribe(t, options=_SUB_OPTIONS)
        log.info("connected to broker %s:%s", self.cfg.host, self.cfg.port)
        self._on_connection(True)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self.connected
        self.connected = False
        if was:
            log.warning("lost broker connection (%s); reconnecting", reason_code)
        self._on_connection(False)

    def _signed(self, topic: str, payload: bytes, will: bool = False) -> Properties | None:
        if not self.cfg.secret:
            return None
        props = Properties(PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
        props.UserProperty = (MAC_PROPERTY, message_mac(self.cfg.secret, topic, payload))
        return props

    def _authentic(self, msg) -> bool:
        props = getattr(msg, "properties", None)
        macs = [v for k, v in (getattr(props, "UserProperty", None) or []) if k == MAC_PROPERTY]
        expected = message_mac(self.cfg.secret, msg.topic, msg.payload)
        return len(macs) == 1 and hmac.compare_digest(macs[0], expected)

    def _handle_message(self, client, userdata, msg):
        if self.cfg.secret and not self._authentic(msg):
            self.rejected += 1
            if self.rejected <= 20 or self.rejected % 1000 == 0:
                log.warning("dropped a message on %s without a valid HMAC (%d so far)",
                            msg.topic, self.rejected)
            return
        try:
            self._on_message(msg.topic, msg.payload)
        except Exception:  # never let one message kill paho's thread
            log.exception("error handling message on %s", msg.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties):
        if self._on_published is not None:
            self._on_published(mid)
