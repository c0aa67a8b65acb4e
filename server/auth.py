"""Who is calling (authentication) and what they may do (authorization).

The interceptor names the caller (bearer token, or the client certificate's CN
under mutual TLS) and checks the method; the servicers ask :meth:`Authority.denied`
about each key, since an aio interceptor never sees request messages.  The
identity travels from the interceptor's handler wrapper to the servicer in a
context variable (both run in the call's task).
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvs_common.secretfile import SecretError, read_private_text

log = logging.getLogger(__name__)

READ, WRITE = "read", "write"
# Launchers and load balancers probe without a credential; Check reveals only SERVING.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
_REPLICA = "/kvs.Replica/"
_ADMIN_OR_PEER = frozenset({"/kvs.KVSExt/MemberRemove", "/kvs.KVSExt/Compact"})
_BEARER = "Bearer "
_HEX64 = re.compile(r"[0-9a-f]{64}")
NO_TOKEN = "missing or invalid token"


@dataclass(frozen=True)
class Identity:
    name: str
    method: str                       # "token" | "cert" | "peer" | "none"
    roles: tuple[str, ...] = ()
    admin: bool = False
    peer: bool = False
    read_prefixes: tuple[str, ...] = ()   # includes the write prefixes
    write_prefixes: tuple[str, ...] = ()
    reads_all: bool = field(default=False, compare=False)   # a "" read prefix: no filtering

    def may(self, access: str, key: str) -> bool:
        prefixes = self.write_prefixes if access == WRITE else self.read_prefixes
        return any(key.startswith(p) for p in prefixes)

    def describe(self) -> str:
        what = ", ".join(self.roles) if self.roles else ("peer" if self.peer else "none")
        return f"{self.name} (roles {what})"


def _identity(name: str, method: str, roles: tuple[str, ...], role_defs: dict) -> Identity:
    admin = any(role_defs[r].get("admin") for r in roles)
    reads, writes = [], []
    for r in roles:
        for perm in role_defs[r].get("permissions", ()):
            (writes if perm["access"] == "readwrite" else reads).append(perm["prefix"])
    if admin:
        reads, writes = [""], [""]
    read_all = sorted(set(reads) | set(writes))
    return Identity(name, method, roles, admin=admin, read_prefixes=tuple(read_all),
                    write_prefixes=tuple(sorted(set(writes))), reads_all="" in read_all)


OPEN = Identity("anonymous", "none", admin=True, peer=True, read_prefixes=("",),
                write_prefixes=("",), reads_all=True)
PEER = Identity("peer", "peer", peer=True)
_ADMIN_ROLE = {"admin": {"admin": True}}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AuthFileError(ValueError):
    """The auth file cannot be used; the message says why."""


def _roles(doc) -> dict:
    roles = dict(_ADMIN_ROLE)
    for name, spec in (doc or {}).items():
        if not isinstance(spec, dict):
            raise AuthFileError(f"role {name!r}: expected an object")
        perms = spec.get("permissions", [])
        if not isinstance(perms, list):
            raise AuthFileError(f"role {name!r}: permissions must be a list")
        for p in perms:
            if not (isinstance(p, dict) and isinstance(p.get("prefix"), str)
                    and p.get("access") in ("read", "readwrite")):
                raise AuthFileError(f"role {name!r}: each permission needs a string prefix and "
                                    f"access 'read' or 'readwrite', got {p!r}")
        if not isinstance(spec.get("admin", False), bool):
            raise AuthFileError(f"role {name!r}: admin must be true or false")
        roles[name] = spec
    return roles


@dataclass(frozen=True)
class Policy:
    """Every credential the server accepts, resolved to identities up front so a
    call costs one sha256 and one dict lookup."""
    by_digest: dict[str, Identity]
    by_cn: dict[str, Identity]

    @property
    def certs(self) -> bool:
        return bool(self.by_cn)

    @classmethod
    def build(cls, auth_file: str | None = None, client_token: str | None = None,
              peer_token: str | None = None) -> "Policy":
        by_digest: dict[str, Identity] = {}
        by_cn: dict[str, Identity] = {}
        if auth_file:
            by_digest, by_cn = _load_users(Path(auth_file))
        if client_token:
            # The shared client token of the course mode: an admin called "client".
            # Without a peer token it is the peers' credential too (as before).
            client = _identity("client", "token", ("admin",), _ADMIN_ROLE)
            if not peer_token:
                client = dataclasses.replace(client, peer=True)
            by_digest[token_digest(client_token)] = client
        if peer_token:
            by_digest[token_digest(peer_token)] = PEER
        return cls(by_digest, by_cn)

    def by_token(self, metadata) -> Identity | str | None:
        """The caller named by its bearer token, a reason (bad token) or None (none sent)."""
        for key, value in metadata or ():
            if key == "authorization":
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                if not value.startswith(_BEARER) or len(value) > 4096:
                    return NO_TOKEN
                # A lookup by digest leaks, through timing, at most something about the
                # digest of a guess -- nothing about a valid token (the usual API-key scheme).
                return self.by_digest.get(token_digest(value[len(_BEARER):])) or NO_TOKEN
        return None

    def by_cert(self, context) -> Identity | str:
        cns = context.auth_context().get("x509_common_name") or ()
        for cn in cns:
            found = self.by_cn.get(cn.decode("utf-8", "replace"))
            if found is not None:
                return found
        return (f"certificate CN {cns[0].decode('utf-8', 'replace')!r} is no user" if cns
                else NO_TOKEN)


def _load_users(path: Path) -> tuple[dict, dict]:
    try:
        doc = json.loads(read_private_text(path, what="auth"))
    except SecretError as e:
        raise AuthFileError(str(e)) from None
    except json.JSONDecodeError as e:
        raise AuthFileError(f"auth file {path}: not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("users"), list):
        raise AuthFileError(f"auth file {path}: expected an object with a list 'users'")
    roles = _roles(doc.get("roles"))
    by_digest: dict[str, Identity] = {}
    by_cn: dict[str, Identity] = {}
    names = set()
    for u in doc["users"]:
        name = u.get("name") if isinstance(u, dict) else None
        if not isinstance(name, str) or not name or name in names or name == "peer":
            raise AuthFileError(f"auth file {path}: each user needs a unique name (not 'peer'), "
                                f"got {u!r:.200}")
        names.add(name)
        user_roles = u.get("roles", [])
        unknown = [r for r in user_roles if r not in roles] if isinstance(user_roles, list) else [0]
        if unknown:
            raise AuthFileError(f"user {name!r}: unknown roles {unknown}")
        digest, cn = u.get("token_sha256"), u.get("cert_cn")
        if (digest is None) == (cn is None):
            raise AuthFileError(f"user {name!r}: give exactly one of token_sha256 and cert_cn")
        if digest is not None:
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
                raise AuthFileError(f"user {name!r}: token_sha256 must be 64 hex digits")
            if digest.lower() in by_digest:
                raise AuthFileError(f"user {name!r}: the same token as another user")
            by_digest[digest.lower()] = _identity(name, "token", tuple(user_roles), roles)
        else:
            if not isinstance(cn, str) or not cn or cn in by_cn:
                raise AuthFileError(f"user {name!r}: cert_cn must be a unique non-empty string")
            by_cn[cn] = _identity(name, "cert", tuple(user_roles), roles)
    return by_digest, by_cn


_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("kvs_caller")


def method_denied(who: Identity, method: str) -> str | None:
    if method.startswith(_REPLICA) and not who.peer:
        return f"{who.describe()} may not call {method}: peers only"
    if method in _ADMIN_OR_PEER and not (who.admin or who.peer):
        return f"{who.describe()} may not call {method}: admin only"
    return None


class Authority:
    """The servicers' view: who is calling, and may they touch this key.
    ``policy`` None: open (course mode), everyone is :data:`OPEN`."""

    def __init__(self, policy: Policy | None, auth_file: str | None = None,
                 client_token: str | None = None, peer_token: str | None = None):
        self.policy = policy
        self._sources = (auth_file, client_token, peer_token)

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    def caller(self) -> Identity:
        # Fail closed: with auth on, a call that skipped the interceptor has no identity.
        return OPEN if self.policy is None else _CALLER.get(_NOBODY)

    def denied(self, access: str, key: str) -> str | None:
        """None when the caller may ``access`` (READ/WRITE) ``key``; else the reason."""
        if self.policy is None:
            return None
        who = _CALLER.get(_NOBODY)
        if who.may(access, key):
            return None
        return f"{who.describe()} may not {access} key {key!r:.300}"

    def read_filter(self):
        """None when the caller may read every key; else a predicate on keys
        (Snapshot and ListKeys return only readable keys)."""
        who = self.caller()
        return None if who.reads_all else (lambda key: who.may(READ, key))

    def reload(self) -> bool:
        """Re-read the auth file (SIGHUP); a bad file keeps the current policy."""
        if self.policy is None or not self._sources[0]:
            log.info("SIGHUP: no auth file to reload")
            return False
        try:
            self.policy = Policy.build(*self._sources)
        except (OSError, ValueError) as e:
            log.error("SIGHUP: auth file not reloaded, keeping the previous one: %s", e)
            return False
        log.info("SIGHUP: auth file reloaded (%d token users, %d certificate users)",
                 len(self.policy.by_digest), len(self.policy.by_cn))
        return True

    def interceptor(self) -> "AuthInterceptor":
        return AuthInterceptor(self)


_NOBODY = Identity("nobody", "none")
OPEN_AUTHORITY = Authority(None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Names the caller before any request is read: a bad or missing token is
    refused (UNAUTHENTICATED, even for unknown methods) without parsing a message."""

    def __init__(self, authority: Authority):
        self._authority = authority

    async def intercept_service(self, continuation, details):
        method = details.method
        if method in OPEN_METHODS:
            return await continuation(details)
        policy = self._authority.policy
        who = policy.by_token(details.invocation_metadata)
        if isinstance(who, str) or (who is None and not policy.certs):
            return _refuse(grpc.StatusCode.UNAUTHENTICATED, who or NO_TOKEN)
        if who is not None:
            reason = method_denied(who, method)
            if reason:
                return _refuse(grpc.StatusCode.PERMISSION_DENIED, reason)
        handler = await continuation(details)
        if handler is None:
            # Authenticated by token: UNIMPLEMENTED.  A certificate is checked first.
            return None if who is not None else _cert_then_unimplemented(policy, method)
        return _as(handler, who, policy, method)


def _refuse(code: grpc.StatusCode, reason: str) -> grpc.RpcMethodHandler:
    # stream-stream whatever the method: the request is never read or parsed.
    async def abort(request_iterator, context):
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(abort)


def _cert_then_unimplemented(policy: Policy, method: str) -> grpc.RpcMethodHandler:
    async def answer(request_iterator, context):
        who = policy.by_cert(context)
        if isinstance(who, str):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, who)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")
        yield  # pragma: no cover

    return grpc.stream_stream_rpc_method_handler(answer)


async def _enter(who: Identity | None, policy: Policy, method: str, context) -> None:
    """Set the caller for this call's task (resolving a certificate identity here:
    the interceptor has no TLS context)."""
    if who is None:
        who = policy.by_cert(context)
        if isinstance(who, str):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, who)
        reason = method_denied(who, method)
        if reason:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
    _CALLER.set(who)


def _as(handler: grpc.RpcMethodHandler, who: Identity | None, policy: Policy,
        method: str) -> grpc.RpcMethodHandler:
    """``handler`` running as ``who``."""
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def behaviour(request, context):
            await _enter(who, policy, method, context)
            async for reply in inner(request, context):
                yield reply
    else:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def behaviour(request, context):
            await _enter(who, policy, method, context)
            return await inner(request, context)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        behaviour, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
