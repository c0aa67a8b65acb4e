"""Reading and writing secret files.

A secret that other local users can read is no secret, so a file with any
group or other read/write bit is refused, as ssh refuses such a private key.
Short secrets are refused too: they can be guessed offline from one signed
message or a sniffed token.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

MIN_LEN = 16


class SecretError(ValueError):
    """A secret that must not be used; the message says why and what to do."""


def read_secret(path: str | os.PathLike | None, env_name: str, *, what: str,
                min_len: int = MIN_LEN) -> str | None:
    """The first line (stripped) of ``path``, else $env_name (stripped), else None."""
    if path:
        text = read_private_text(path, what=what).strip()
        if not text:
            raise SecretError(f"{what} file {path} is empty")
        return _checked(text.splitlines()[0].strip(), f"{what} in {path}", min_len)
    value = (os.environ.get(env_name) or "").strip()
    return _checked(value, f"{what} in ${env_name}", min_len) if value else None


def read_private_text(path: str | os.PathLike, *, what: str) -> str:
    """The whole text of a file only its owner may read or write (e.g. the auth file)."""
    try:
        # fstat the open file, not the name: the mode checked is the mode of what is read.
        # O_NONBLOCK: a FIFO in place of the file must not hang us (refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{what} file {path} is not a regular file")
        exposed = _exposure(st.st_mode)
        if exposed:
            raise SecretError(f"{what} file {path} is {exposed} (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"chmod 600 it")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{what} file {path} is not UTF-8 text") from None


def _exposure(mode: int) -> str:
    """'readable by group and others', ... or '' when only the owner may read or write."""
    parts = []
    for verb, g, o in (("readable", stat.S_IRGRP, stat.S_IROTH),
                       ("writable", stat.S_IWGRP, stat.S_IWOTH)):
        who = [name for name, bit in (("group", g), ("others", o)) if mode & bit]
        if who:
            parts.append(f"{verb} by {' and '.join(who)}")
    return ", ".join(parts)


def _checked(secret: str, where: str, min_len: int) -> str:
    if len(secret) < min_len:
        raise SecretError(f"{where} is {len(secret)} characters long; at least {min_len} are "
                          f"needed (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return secret


def write_secret_file(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` atomically by a 0600 file holding ``text``.

    mkstemp creates the temporary file 0600 whatever the umask, so the secret
    is never readable by others, not even briefly."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
