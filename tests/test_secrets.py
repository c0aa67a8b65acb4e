"""kvs_common.secretfile (refusing exposed, empty and short secrets; writing
them 0600) and kvs_common.keys (HKDF, one key per purpose)."""
from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest

from kvs_common.keys import KEY_LEN, MQTT_MAC, derive_key
from kvs_common.secretfile import (MIN_LEN, SecretError, read_private_text, read_secret,
                                   write_secret_file)

GOOD = "s3cr3t-0123456789abcdef"   # 23 characters
ENV = "KVS_TEST_SECRET"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def secret_file(tmp_path, text: str, mode: int = 0o600, name: str = "s.secret"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def refused(path, env=ENV, **kw) -> str:
    with pytest.raises(SecretError) as exc:
        read_secret(path, env, what="cluster secret", **kw)
    return str(exc.value)


# -- reading ------------------------------------------------------------------------
def test_first_line_of_the_file_stripped(tmp_path):
    path = secret_file(tmp_path, f"  {GOOD}  \nsecond line is ignored\n")
    assert read_secret(path, ENV, what="token") == GOOD
    assert read_secret(str(path), ENV, what="token") == GOOD


def test_file_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "from-the-environment-0123")
    assert read_secret(secret_file(tmp_path, GOOD), ENV, what="token") == GOOD


def test_environment_when_no_file(monkeypatch):
    assert read_secret(None, ENV, what="token") is None
    monkeypatch.setenv(ENV, "   ")
    assert read_secret(None, ENV, what="token") is None   # blank counts as unset
    monkeypatch.setenv(ENV, f" {GOOD}\n")
    assert read_secret(None, ENV, what="token") == GOOD
    assert read_secret("", ENV, what="token") == GOOD


@pytest.mark.parametrize("mode, words", [
    (0o644, "readable by group and others"),
    (0o640, "readable by group"),
    (0o604, "readable by others"),
    (0o620, "writable by group"),
    (0o602, "writable by others"),
    (0o666, "readable by group and others, writable by group and others"),
    (0o460, "readable by group, writable by group"),
])
def test_file_open_to_group_or_others_is_refused_like_ssh(tmp_path, mode, words):
    path = secret_file(tmp_path, GOOD, mode)
    msg = refused(path)
    assert msg == f"cluster secret file {path} is {words} (mode {mode:04o}); chmod 600 it"
    assert GOOD not in msg


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o611])
def test_private_modes_are_accepted(tmp_path, mode):
    # execute bits expose nothing; only read and write bits count
    assert read_secret(secret_file(tmp_path, GOOD, mode), ENV, what="token") == GOOD


def test_mode_checked_is_the_symlink_target(tmp_path):
    target = secret_file(tmp_path, GOOD, 0o600, "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_secret(link, ENV, what="token") == GOOD
    os.chmod(target, 0o644)
    assert "mode 0644" in refused(link)


@pytest.mark.parametrize("text", ["", "\n", "  \n\n  ", "\n" + GOOD])
def test_empty_file_is_refused(tmp_path, text):
    path = secret_file(tmp_path, text)
    if text.strip():   # a leading blank line: the first non-blank line counts
        assert read_secret(path, ENV, what="token") == GOOD
    else:
        assert refused(path) == f"cluster secret file {path} is empty"


def test_short_secret_in_a_file_is_refused(tmp_path):
    short = "x" * (MIN_LEN - 1)
    path = secret_file(tmp_path, short + "\n")
    msg = refused(path)
    assert msg.startswith(f"cluster secret in {path} is {MIN_LEN - 1} characters long; "
                          f"at least {MIN_LEN} are needed")
    assert short not in msg
    assert read_secret(secret_file(tmp_path, "x" * MIN_LEN), ENV, what="t") == "x" * MIN_LEN
    assert MIN_LEN == 16


def test_min_len_is_a_parameter(tmp_path):
    path = secret_file(tmp_path, GOOD)
    assert "at least 64" in refused(path, min_len=64)
    assert read_secret(secret_file(tmp_path, "abc", name="p"), ENV, what="pw", min_len=3) == "abc"


def test_short_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "hunter2")
    msg = refused(None)
    assert msg.startswith(f"cluster secret in ${ENV} is 7 characters long; at least 16")
    assert "hunter2" not in msg


@pytest.mark.parametrize("make", ["missing", "directory", "fifo", "not-utf8"])
def test_unreadable_files_raise_secret_error(tmp_path, make):
    path = tmp_path / "s"
    if make == "directory":
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
    elif make == "fifo":   # no writer: a blocking open would hang
        os.mkfifo(path, 0o600)
    elif make == "not-utf8":
        path.write_bytes(b"\xff\xfe" + b"x" * 30)
        os.chmod(path, 0o600)
    msg = refused(path)
    assert str(path) in msg
    assert {"missing": "cannot read cluster secret file", "directory": "not a regular file",
            "fifo": "not a regular file", "not-utf8": "not UTF-8"}[make] in msg


def test_private_text_is_the_whole_file_under_the_same_mode_rules(tmp_path):
    doc = '{"users": [],\n "roles": {}}\n'
    path = secret_file(tmp_path, doc, name="auth.json")
    assert read_private_text(path, what="auth") == doc
    os.chmod(path, 0o640)
    with pytest.raises(SecretError, match=r"auth file .* is readable by group \(mode 0640\); chmod 600 it"):
        read_private_text(path, what="auth")


def test_secret_error_is_a_value_error():
    assert issubclass(SecretError, ValueError)


# -- writing ------------------------------------------------------------------------
def test_write_secret_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "new" / "deeper" / "token"
        write_secret_file(path, GOOD + "\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700   # created parents: private
    assert path.read_text() == GOOD + "\n"
    assert read_secret(path, ENV, what="token") == GOOD
    assert os.listdir(path.parent) == ["token"]                 # no temporary left behind


def test_write_secret_file_replaces_an_exposed_file(tmp_path):
    path = secret_file(tmp_path, "old-" + GOOD, 0o644)
    inode = path.stat().st_ino
    write_secret_file(path, GOOD)
    st = path.stat()
    # a new inode: a reader that had the old 0644 file open never sees the new secret
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_ino != inode
    assert path.read_text() == GOOD


def test_failed_write_keeps_the_old_secret_and_leaves_nothing(tmp_path):
    path = secret_file(tmp_path, GOOD)
    with pytest.raises(TypeError):
        write_secret_file(path, b"bytes are not text")   # type: ignore[arg-type]
    assert path.read_text() == GOOD
    assert os.listdir(tmp_path) == [path.name]


# -- key derivation ------------------------------------------------------------------
def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, written out here only to pin down the scheme derive_key uses."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm, i = okm + block, i + 1
    return okm[:length]


def test_reference_hkdf_matches_rfc5869_test_case_1():
    okm = _hkdf_sha256(bytes([0x0b] * 22), bytes(range(13)), bytes(range(0xf0, 0xfa)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_derive_key_is_hkdf_sha256_with_the_fixed_salt_and_purpose_as_info():
    secret = b"a cluster secret of some length"
    key = derive_key(secret, MQTT_MAC)
    assert len(key) == KEY_LEN == 32
    assert key == _hkdf_sha256(secret, b"kvs-hkdf-v1", b"mqtt-mac", 32)
    assert key == derive_key(bytearray(secret), "mqtt-mac")   # deterministic: servers agree
    assert key != secret[:32]


def test_one_key_per_purpose_and_per_secret():
    keys = {derive_key(s, p) for s in (b"secret-one-0123456", b"secret-two-0123456")
            for p in ("mqtt-mac", "other-purpose", "mqtt-mac2")}
    assert len(keys) == 6


@pytest.mark.parametrize("secret, purpose", [(b"", "mqtt-mac"), (b"x" * 32, ""),
                                             ("a str secret", "mqtt-mac"), (None, "mqtt-mac")])
def test_derive_key_refuses_bad_input(secret, purpose):
    with pytest.raises(ValueError):
        derive_key(secret, purpose)
