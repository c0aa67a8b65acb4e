"""Running Mosquitto without root.

Started as root, Mosquitto switches to the account named by its ``user``
setting and only *then* opens its password file, ACL file, certificate and
key.  Ours are 0600 files in 0700 directories owned by whoever runs the
launcher, so the broker gets private copies: a 0700 directory owned by that
account, under the system temp directory (every account can reach it, unlike a
0700 run directory or a test's temp directory).  Not root: nothing to drop,
the broker runs as us and reads the originals.
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Mapping


def broker_account() -> pwd.struct_passwd | None:
    """The account a broker started by root runs as: ``mosquitto`` if it exists, else
    the user who ran sudo, else ``nobody``.  None when we are not root (no switch)."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", os.environ.get("SUDO_USER") or "", "nobody"):
        if not name or name == "root":
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and no unprivileged account (mosquitto, $SUDO_USER, "
                       "nobody) to run the broker as")


def private_copies(files: Mapping[str, Path], account: pwd.struct_passwd) -> tuple[Path, dict[str, Path]]:
    """Copy ``files`` (setting -> path) into a new directory that only ``account`` can
    read; return the directory and setting -> copied path."""
    d = Path(tempfile.mkdtemp(prefix="kvs-broker-files-"))
    try:
        out: dict[str, Path] = {}
        for setting, src in files.items():
            dst = d / f"{setting}-{Path(src).name}"
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh, open(src, "rb") as inp:
                shutil.copyfileobj(inp, fh)
            os.chown(dst, account.pw_uid, account.pw_gid)
            out[setting] = dst
        os.chown(d, account.pw_uid, account.pw_gid)
        os.chmod(d, 0o700)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d, out


def remove_copies(d: Path | str | None) -> None:
    """Remove a directory made by :func:`private_copies` (only such a directory)."""
    if d and Path(d).name.startswith("kvs-broker-files-"):
        shutil.rmtree(d, ignore_errors=True)
