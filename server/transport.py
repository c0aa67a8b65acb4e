"""The MQTT connection: paho-mqtt 2.x driven by the caller's asyncio loop.

Reads, writes, keepalive, reconnects and the receive-path watchdog all run on
the server's one event loop; there are no threads.  Nothing that anyone
publishes can raise out of a callback here: a bad message is counted and
dropped, and a broken stream is replaced by a new connection.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from kvs_common.keys import MQTT_MAC, derive_key

log = logging.getLogger(__name__)

MAC_PROPERTY = "kvs-mac"

_MIN_BACKOFF, _MAX_BACKOFF = 0.1, 2.0
_CONNECT_TIMEOUT = 5.0      # TCP connect + TLS handshake
_STOP_GRACE = 1.0           # for the DISCONNECT to leave before the socket is cut
_READ_BATCH = 256           # packets per readiness callback: gRPC shares this loop
_WARN_PERIOD = 10.0         # seconds between repeats of one kind of warning

if not hasattr(mqtt.Client, "_create_socket"):  # see _Client
    raise ImportError("paho-mqtt without Client._create_socket; requirements.txt pins the version")


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


def mac_key(secret: bytes) -> bytes:
    """The HMAC key of broker messages: derived from the cluster secret with
    HKDF, never the secret itself.  Servers from before this keyed the MAC with
    the raw secret; they and newer servers refuse each other's messages, so a
    cluster upgrades all its servers together."""
    return derive_key(secret, MQTT_MAC)


def message_mac(secret: bytes, topic: str, payload: bytes) -> str:
    """The kvs-mac value a server holding the cluster ``secret`` puts on a
    message (for tools and tests; the transport derives its key once)."""
    return _mac(mac_key(secret), topic, payload)


def _mac(key: bytes, topic: str, payload: bytes) -> str:
    """HMAC-SHA256 over topic and payload (binding the topic stops a valid
    document from being replayed on another topic)."""
    return hmac.new(key, topic.encode() + b"\n" + payload, hashlib.sha256).hexdigest()


def _authentic(key: bytes, topic: str, payload: bytes, props) -> bool:
    """Exactly one kvs-mac user property, and it matches the MAC under ``key``
    (see mac_key).  Never raises: the properties are whatever a stranger chose
    to send."""
    try:
        macs = [v for k, v in (getattr(props, "UserProperty", None) or ()) if k == MAC_PROPERTY]
        if len(macs) != 1 or not isinstance(macs[0], str) or len(macs[0]) != 64:
            return False
        # bytes, not str: compare_digest raises TypeError on non-ASCII text
        return hmac.compare_digest(macs[0].encode("utf-8", "replace"),
                                   _mac(key, topic, payload).encode())
    except Exception:
        return False


class _Throttle:
    """One warning per kind per period, telling how many were held back."""

    def __init__(self, period: float):
        self.period = period
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, kind: str, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._next[kind] = now + self.period
        held = self._held.pop(kind, 0)
        if held:
            fmt, args = fmt + " (%d more like this not logged)", (*args, held)
        log.warning(fmt, *args, exc_info=exc_info)


class _Client(mqtt.Client):
    """paho's client, given a socket we connected on the loop: paho's own
    connect and TLS handshake block, which would stall gRPC for up to the
    connect timeout whenever the broker is unreachable."""

    premade: socket.socket | None = None

    def _create_socket(self):
        sock, self.premade = self.premade, None
        if sock is None:  # never let paho open a (blocking, possibly plain-text) one itself
            raise ConnectionError("no socket prepared")
        return sock


class MqttTransport:
    def __init__(self, cfg: BrokerConfig, client_id: str,
                 on_message: Callable[[str, bytes], None],
                 on_connection: Callable[[bool], None],
                 will: tuple[str, bytes] | None = None,
                 watchdog_topic: str | None = None,
                 watchdog_interval: float = 1.0, watchdog_timeout: float = 5.0):
        self.cfg = cfg
        self._on_message = on_message
        self._on_connection = on_connection
        self._subs: dict[str, bool] = {}        # topic -> no_local
        self._watch_topic = watchdog_topic
        self._watch_interval = watchdog_interval
        self._watch_timeout = watchdog_timeout
        self._tick_period = min(watchdog_interval, 1.0) if watchdog_topic else 1.0
        self._ping_token = os.urandom(8).hex().encode()  # our pings, not an old or foreign one
        self._ping_seq = 0
        self._ping_rx_at = self._ping_tx_at = self._last_tick = 0.0
        self.connected = False
        self.rejected = 0      # messages dropped for a missing or invalid HMAC
        self.dropped = 0       # messages whose handler raised, or that paho could not parse
        self._received = 0
        self._was_up = False   # this connection attempt got a CONNACK
        self._closed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._throttle = _Throttle(_WARN_PERIOD)
        self._tls = self._tls_context(cfg) if cfg.tls_ca else None
        self._mac_key = mac_key(cfg.secret) if cfg.secret else None   # once, not per message

        # MQTT 5 for the no-local subscription option: a server does not get
        # its own messages echoed back.
        c = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(64)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True,
                       properties=self._signed(will[0], will[1], will=True))
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_socket_register_write = self._register_write
        c.on_socket_unregister_write = self._unregister_write
        self.client = c

    @staticmethod
    def _tls_context(cfg: BrokerConfig) -> ssl.SSLContext:
        # what paho's tls_set builds: verify the broker's certificate and name
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cfg.tls_ca)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        return ctx

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Call from a coroutine.  Connects in the background and keeps
        reconnecting until stop(); never raises for an absent broker."""
        self._loop = asyncio.get_running_loop()
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                  clean_start=True)
        self._task = self._loop.create_task(self._supervise(), name="mqtt-transport")

    async def stop(self) -> None:
        """Disconnect cleanly (the broker drops our will).  Whatever was
        published before is sent first; on_connection is not called."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.connected = False
        if self.client.socket() is None:
            return
        try:
            self.client.disconnect()
            self.client.loop_write()   # paho closes the socket once the DISCONNECT is out
            if self.client.socket() is not None:
                await asyncio.wait_for(self._closed.wait(), _STOP_GRACE)
        except Exception:   # timed out, or the socket broke: cut it below
            pass
        self._abort()

    # -- subscriptions survive reconnects (clean start) -------------------------
    def subscribe(self, topic: str, no_local: bool = True) -> None:
        self._subs[topic] = no_local
        if self.connected:
            self.client.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=no_local))

    def unsubscribe(self, topic: str) -> None:
        if self._subs.pop(topic, None) is not None and self.connected:
            self.client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """False when not connected: nothing is queued for a later connection,
        where it would be stale."""
        if not self.connected:
            return False
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                       properties=self._signed(topic, payload))
        except (ValueError, TypeError) as exc:   # e.g. a wildcard in the topic, payload too big
            self._throttle.warn("publish", "cannot publish on %s: %s", topic, exc)
            return False
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _signed(self, topic: str, payload: bytes, will: bool = False) -> Properties | None:
        if not self._mac_key:
            return None
        props = Properties(PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
        props.UserProperty = (MAC_PROPERTY, _mac(self._mac_key, topic, payload))
        return props

    # -- connection supervisor: one task, for the transport's whole life ----------
    async def _supervise(self) -> None:
        delay = _MIN_BACKOFF
        while True:
            self._was_up = False
            try:
                sock = await asyncio.wait_for(self._open_socket(), _CONNECT_TIMEOUT)
                self.client.premade = sock
                self.client.reconnect()     # sends CONNECT; the CONNACK comes through the reader
                self._closed.clear()        # (reconnect closed any previous socket first)
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # refused, unreachable, TLS, ...
                self._throttle.warn("connect", "cannot connect to broker %s:%s: %r",
                                    self.cfg.host, self.cfg.port, exc)
            if self._was_up:
                delay = _MIN_BACKOFF
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

    async def _open_socket(self) -> socket.socket:
        loop = self._loop
        try:  # an address needs no resolver (asyncio's runs in a helper thread)
            infos = socket.getaddrinfo(self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await loop.getaddrinfo(self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM)
        error: Exception = OSError(f"no address for {self.cfg.host}")
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
                # paho leaves Nagle on: small messages would wait for the
                # previous segment's ACK (~40-90 ms each).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return await self._tls_handshake(sock) if self._tls else sock
            except Exception as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    async def _tls_handshake(self, raw: socket.socket) -> ssl.SSLSocket:
        tls = self._tls.wrap_socket(raw, server_hostname=self.cfg.host,
                                    do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await self._ready(tls, write=False)
                except ssl.SSLWantWriteError:
                    await self._ready(tls, write=True)
        except BaseException:
            tls.close()
            raise

    async def _ready(self, sock, write: bool) -> None:
        loop = self._loop
        done = loop.create_future()
        (loop.add_writer if write else loop.add_reader)(
            sock, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            (loop.remove_writer if write else loop.remove_reader)(sock)

    async def _serve(self) -> None:
        """Runs paho's timers and the watchdog until the socket closes."""
        self._last_tick = self._loop.time()
        while not self._closed.is_set():
            try:
                await asyncio.wait_for(self._closed.wait(), self._tick_period)
            except asyncio.TimeoutError:
                self._tick()

    def _tick(self) -> None:
        try:
            now = self._loop.time()
            stalled = now - self._last_tick > 2 * self._tick_period + 1.0
            self._last_tick = now
            self.client.loop_misc()         # keepalive PINGREQ, CONNACK/PINGRESP timeout
            if not (self.connected and self._watch_topic):
                return
            if stalled:  # time the loop did not run says nothing about the broker
                self._ping_rx_at = now
            if now - self._ping_rx_at > self._watch_timeout:
                log.warning("no watchdog ping back from the broker for %.1f s: treating the "
                            "connection as dead and reconnecting", now - self._ping_rx_at)
                self._set_connected(False)
                self._abort()
            elif now - self._ping_tx_at >= self._watch_interval - self._tick_period / 2:
                self._ping_tx_at = now
                self._ping_seq += 1
                payload = self._ping_token + b" %d" % self._ping_seq
                self.client.publish(self._watch_topic, payload, qos=0,
                                    properties=self._signed(self._watch_topic, payload))
        except Exception:
            self._throttle.warn("tick", "MQTT timer failed", exc_info=True)

    def _abort(self) -> None:
        """Replace a connection we cannot trust: say goodbye if the broker
        still reads (no will), else cut the socket; the supervisor reconnects."""
        c = self.client
        sock = c.socket()
        if sock is None:
            return
        try:
            self._loop.remove_reader(sock)   # paho's input state may be unusable
            c.disconnect()
            c.loop_write()                   # paho closes the socket once the DISCONNECT is out
            if c.socket() is sock:           # the broker is not reading: cut it
                sock.shutdown(socket.SHUT_RDWR)
                c.loop_write()               # fails with EPIPE, and paho closes the socket
        except Exception:
            self._throttle.warn("abort", "error while dropping the broker connection",
                                exc_info=True)
        if c.socket() is sock:               # last resort: paho's own close
            c._sock_close()

    def _set_connected(self, up: bool) -> None:
        if self.connected == up:
            return
        self.connected = up
        try:
            self._on_connection(up)
        except Exception:
            self._throttle.warn("on_connection", "on_connection(%s) raised", up, exc_info=True)

    # -- socket readiness (the loop) --------------------------------------------
    def _on_readable(self) -> None:
        c = self.client
        try:
            for _ in range(_READ_BATCH):
                seen = self._received
                if c.loop_read() != mqtt.MQTT_ERR_SUCCESS or self._received == seen:
                    break   # error, partial packet, or a non-PUBLISH: epoll calls again
            sock = c.socket()
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                self._loop.call_soon(self._on_readable)   # decrypted bytes epoll cannot see
        except Exception:
            # paho failed mid-packet: its input state is undefined, so start over
            self.dropped += 1
            self._throttle.warn("read", "unreadable packet from the broker; reconnecting",
                                exc_info=True)
            self._set_connected(False)
            self._abort()

    def _on_writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception:
            self._throttle.warn("write", "MQTT write failed; reconnecting", exc_info=True)
            self._set_connected(False)
            self._abort()

    # -- paho callbacks (called from loop_read/loop_write/loop_misc) --------------
    def _socket_open(self, client, userdata, sock) -> None:
        self._loop.add_reader(sock, self._on_readable)

    def _socket_close(self, client, userdata, sock) -> None:
        try:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        except Exception:   # the loop may already be closed at exit
            pass
        self._closed.set()

    def _register_write(self, client, userdata, sock) -> None:
        self._loop.add_writer(sock, self._on_writable)

    def _unregister_write(self, client, userdata, sock) -> None:
        self._loop.remove_writer(sock)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self._throttle.warn("refused", "broker refused the connection: %s", reason_code)
                return
            self._was_up = True
            self._ping_rx_at = self._loop.time()    # the watchdog's grace starts now
            self._ping_tx_at = 0.0
            topics = [(t, SubscribeOptions(qos=1, noLocal=nl)) for t, nl in self._subs.items()]
            if self._watch_topic:  # our own pings must come back: no no-local here
                topics.append((self._watch_topic, SubscribeOptions(qos=0, noLocal=False)))
            if topics:
                client.subscribe(topics)
            log.info("connected to broker %s:%s", self.cfg.host, self.cfg.port)
            self._set_connected(True)
        except Exception:
            self._throttle.warn("on_connect", "error handling CONNACK", exc_info=True)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if self.connected:
                log.warning("lost broker connection (%s); reconnecting", reason_code)
            self._set_connected(False)
        except Exception:
            self._throttle.warn("on_disconnect", "error handling a disconnect", exc_info=True)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            bad = [str(rc) for rc in reason_codes if rc.is_failure]
            if bad:
                self._throttle.warn("suback", "broker refused a subscription: %s", ", ".join(bad))
        except Exception:
            pass

    def _handle_message(self, client, userdata, msg) -> None:
        self._received += 1
        try:
            topic = msg.topic             # raises for a topic that is not UTF-8
            payload = msg.payload
            if self._mac_key and not _authentic(self._mac_key, topic, payload,
                                                msg.properties):
                self.rejected += 1
                self._throttle.warn("mac", "rejected a message on %.200s without a valid HMAC "
                                    "(%d so far)", topic, self.rejected)
                return
            if topic == self._watch_topic:
                if payload.startswith(self._ping_token):
                    self._ping_rx_at = self._loop.time()
                return
            self._on_message(topic, payload)
        except Exception:
            self.dropped += 1
            self._throttle.warn("message", "dropped a message (%d so far)", self.dropped,
                                exc_info=True)
