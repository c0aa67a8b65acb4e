"""Client authentication (bearer token), TLS credentials and secrets loading.

Secrets come from files or the environment, never from the command line
(where ``ps`` would show them), and are never logged.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

# Health checks stay open: load balancers and launchers probe without a token.
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


def read_secret(file: str | None, env_name: str) -> str | None:
    """A secret from ``file`` (first line, stripped) or else from $env_name."""
    if file:
        text = Path(file).read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"secret file {file} is empty")
        return text.splitlines()[0].strip()
    value = os.environ.get(env_name)
    return value.strip() if value and value.strip() else None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (constant-time
    compare) with UNAUTHENTICATED before any handler runs."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_METHODS) or \
                self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
