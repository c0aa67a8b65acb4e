"""Data at rest: another local user can read nothing of a secure cluster's run
directory (secrets, TLS keys, broker accounts, data dirs, logs), and cannot
find a stored value in it.

The attacker is a real unprivileged account (switched to with setpriv), so
this needs root, as CI has.  It is an account with no passwd entry rather
than ``nobody``: a launcher run as root may hand the broker to ``nobody``,
and the broker is allowed its own files.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import RPC_TIMEOUT, wait_until
from kvs_cluster import Cluster, Security
from kvs_proto import kvs_pb2, kvs_pb2_grpc

pytestmark = pytest.mark.integration

SETPRIV = shutil.which("setpriv") or "setpriv"
# Public by design: certificates (gen_certs.sh makes them 0644, inside a 0700 directory).
PUBLIC_SUFFIXES = (".pem",)


def stranger() -> tuple[int, int]:
    """A uid and gid that no account or group uses: nobody the cluster knows."""
    for uid in range(64999, 60000, -1):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid, uid
    raise AssertionError("no free uid/gid for the stranger")


def as_stranger(ids: tuple[int, int], script: str, *args: str) -> subprocess.CompletedProcess:
    uid, gid = ids
    return subprocess.run([SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "--", "/bin/sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


# What the stranger manages to read or list, one path a line.
_PROBE = ('for p in "$@"; do '
          '  if [ -d "$p" ]; then ls -- "$p" >/dev/null 2>&1 && echo "listed $p"; '
          '  else cat -- "$p" >/dev/null 2>&1 && echo "read $p"; fi; '
          'done; exit 0')


def walk(root: Path) -> list[Path]:
    out = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [Path(dirpath) / n for n in dirnames + filenames]
    return out


def exposed_modes(paths: list[Path]) -> list[str]:
    """Anything with a group or other permission bit, except public certificates."""
    bad = []
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode) or p.name.endswith(PUBLIC_SUFFIXES):
            continue
        if st.st_mode & 0o077:
            bad.append(f"{stat.S_IMODE(st.st_mode):04o} {p}")
    return bad


@pytest.fixture
def base():
    """A world-traversable parent (0711, like a home directory), so that only the
    cluster's own modes stand between the stranger and its files -- a test
    temp dir that is itself 0700 would hide everything and prove nothing."""
    d = Path(tempfile.mkdtemp(prefix="kvs-at-rest-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_stranger_reads_nothing_of_a_secure_cluster(base):
    assert os.geteuid() == 0, "needs root, to act as another user (setpriv)"
    who = stranger()
    value = f"at-rest-canary-{uuid.uuid4().hex}"

    # control: the stranger can read what is meant to be readable
    probe = base / "public.txt"
    probe.write_text(value[:5])
    os.chmod(probe, 0o644)
    got = as_stranger(who, 'cat -- "$1"', str(probe))
    assert got.returncode == 0 and got.stdout == value[:5], got

    run = base / "run"
    sec = Security.ensure(run)
    with Cluster(n=3, workdir=run, security=sec) as c:
        c.wait_ready(60)
        md = c.metadata()
        stubs = [(s.address, c.channel(s.address)) for s in c.servers]
        try:
            kvs = [kvs_pb2_grpc.KVSStub(ch) for _, ch in stubs]
            assert kvs[0].Insere(kvs_pb2.ChaveValor(chave="secret", valor=value), metadata=md,
                                 timeout=RPC_TIMEOUT).versao > 0
            for (addr, _), k in zip(stubs, kvs):
                wait_until(lambda k=k: k.Consulta(kvs_pb2.ChaveVersao(chave="secret"), metadata=md,
                                                  timeout=5).valor == value,
                           timeout=30, what=f"the value on {addr}")
        finally:
            for _, ch in stubs:
                ch.close()
        data_dirs = [s.data_dir for s in c.servers]
        check(who, run, data_dirs, value, "while the cluster runs")
    check(who, run, data_dirs, value, "after it stopped")


def check(who: tuple[int, int], run: Path, data_dirs: list[Path], value: str, when: str) -> None:
    paths = walk(run)
    for d in data_dirs:
        assert d in paths, f"data dir {d} is not under {run}"
    # control: the value really is at rest in every data dir, so a grep could find it
    for d in data_dirs:
        hit = subprocess.run(["grep", "-rlF", "--", value, str(d)], capture_output=True, text=True)
        assert hit.stdout.strip(), f"{when}: the value is not on disk in {d}; the grep below proves nothing"

    got = as_stranger(who, _PROBE, *map(str, paths))
    assert got.returncode == 0, got.stderr
    grep = as_stranger(who, 'grep -rlF -- "$1" "$2"; exit 0', value, str(run))
    modes = exposed_modes(paths)
    problems = []
    if got.stdout.strip():
        problems.append(f"the stranger (uid {who[0]}) could open:\n{got.stdout}")
    if grep.stdout.strip():
        problems.append(f"the stranger's grep found the value in:\n{grep.stdout}")
    if modes:
        problems.append("group/other permission bits (a chmod of a parent away from "
                        "exposure):\n" + "\n".join(modes))
    assert not problems, f"{when}, {len(paths)} paths under {run}:\n" + "\n".join(problems)
