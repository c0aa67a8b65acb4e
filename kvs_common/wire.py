"""What goes over the wire between KVS clients and servers, said once.

Metadata keys, their fixed values and message-size limits used by the server,
the shell, the cluster launcher and the benchmark; and the environment
variables every client reads its credentials from.
"""
from __future__ import annotations

# -- call metadata (gRPC lower-cases keys) ---------------------------------
AUTHORIZATION = "authorization"     # "Bearer <token>"
BEARER = "Bearer "
REQUEST_ID = "kvs-request-id"       # idempotency key of a write (a stream's i-th change: <id>.<i>)
CONSISTENCY = "kvs-consistency"     # request: how a read is served
ERROR = "kvs-error"                 # trailing: why an answer is -1 / blank
NODE = "kvs-node"                   # trailing: the node that answered
# Session guarantees over several servers: every KVS answer carries the answering server's
# "<cluster id>/<applied position>"; a read sent with the greatest one a client has seen waits
# until its server has applied that far (read-your-writes, monotonic reads).
POSITION = "kvs-position"           # trailing: "<cluster id>/<position>"
AFTER = "kvs-after"                 # request: "<cluster id>/<position>" a read waits for

LOCAL, LINEARIZABLE = "local", "linearizable"   # values of CONSISTENCY
CONSISTENCY_LEVELS = (LOCAL, LINEARIZABLE)

# -- limits ----------------------------------------------------------------
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024   # largest request a server takes by default
# Clients receive up to this much, so that the server is the one that refuses.
CLIENT_MAX_MESSAGE = 64 * 1024 * 1024

# -- where clients find their credentials (run/client.env sets these) -------
TOKEN_ENV = "KVS_TOKEN"
TOKEN_FILE_ENV = "KVS_TOKEN_FILE"
TLS_CA_ENV = "KVS_TLS_CA"
CLIENT_CERT_ENV = "KVS_CLIENT_CERT"
CLIENT_KEY_ENV = "KVS_CLIENT_KEY"
CLIENT_ENV_VARS = (TOKEN_ENV, TOKEN_FILE_ENV, TLS_CA_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV)
