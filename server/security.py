"""TLS credentials of the gRPC server (its calls to peers use kvs_common.channel).

Who may call what lives in server/auth.py; secrets are read by
kvs_common.secretfile (files or the environment, never the command line).
"""
from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
