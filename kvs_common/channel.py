"""Making a gRPC channel to a KVS server, said once: target, TLS, credentials.

``tls_ca``, ``cert`` and ``key`` are PEM ``bytes`` or paths to PEM files.
Without ``tls_ca`` the channel is plaintext; ``cert``/``key`` (a client
certificate, for servers that require mutual TLS) need ``tls_ca``.  A client
never needs a server's private key: give it a certificate of its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import grpc

from .wire import AUTHORIZATION, BEARER

PemSource = bytes | str | os.PathLike | None

# A local cluster is never behind an HTTP proxy; a developer's $http_proxy must not
# send KVS calls to it.
BASE_OPTIONS = (("grpc.enable_http_proxy", 0),)


def read_pem(source: PemSource) -> bytes | None:
    """PEM bytes from bytes (as is) or a path (read)."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is none)."""
    return ((AUTHORIZATION, BEARER + token),) if token else ()


def credentials(tls_ca: PemSource, cert: PemSource = None,
                key: PemSource = None) -> grpc.ChannelCredentials:
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca),
                                        private_key=read_pem(key),
                                        certificate_chain=read_pem(cert))


def make_channel(target: str, *, tls_ca: PemSource = None, cert: PemSource = None,
                 key: PemSource = None, options: Sequence[tuple] = (), aio: bool = False,
                 server_name: str | None = None, token: str | None = None):
    """A channel to ``target`` (``host:port`` or any grpc target, e.g. ``ipv4:a,b``).

    ``server_name``: the name the server certificate must carry when the target does
    not say it (multi-address targets).  ``token``: attached to every call (sync
    channels only; otherwise pass ``metadata=bearer(token)`` per call)."""
    if tls_ca is None and (cert is not None or key is not None):
        raise ValueError("a client certificate needs a CA (tls_ca)")
    opts = list(BASE_OPTIONS) + list(options)
    if server_name and tls_ca is not None:
        opts.append(("grpc.ssl_target_name_override", server_name))
    mod = grpc.aio if aio else grpc
    if tls_ca is None:
        channel = mod.insecure_channel(target, options=opts)
    else:
        channel = mod.secure_channel(target, credentials(tls_ca, cert, key), options=opts)
    if token:
        if aio:
            raise ValueError("token= needs a sync channel; pass metadata=bearer(token) per call")
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (replacing one given)."""

    def __init__(self, token: str):
        self._md = bearer(token)

    def _details(self, d):
        md = [m for m in (d.metadata or ()) if m[0] != AUTHORIZATION] + list(self._md)
        return _CallDetails(d.method, d.timeout, md, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
