"""One key per purpose, derived from a cluster secret with HKDF-SHA256 (RFC 5869).

A key used for one thing (say, MACs of broker messages) then reveals nothing
about the key for another, and the secret itself is never used as a key.
"""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MQTT_MAC = "mqtt-mac"          # HMAC-SHA256 of every broker message

KEY_LEN = 32
# Fixed, public salt: the secret is already random; the salt only versions the scheme.
_SALT = b"kvs-hkdf-v1"


def derive_key(secret: bytes, purpose: str) -> bytes:
    """The 32-byte key for ``purpose`` (the HKDF info) derived from ``secret``."""
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("derive_key needs a non-empty bytes secret")
    if not purpose:
        raise ValueError("derive_key needs a purpose")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=_SALT, info=purpose.encode())
    return hkdf.derive(bytes(secret))
