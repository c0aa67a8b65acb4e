"""``client.sh``: the course Rust client's command line, on the shell's client.

    ./client.sh -p PORT -o OP [-k K...] [-v V...] [-e VER...]

OP is insere | consulta | remove | insere-v | consulta-v | remove-v | snapshot.
Several keys, values or versions can be given either as several words after
one flag (``-k a b c``) or by repeating the flag (``-k a -k b -k c``), or mixed;
the i-th key goes with the i-th value / version.  A word is a value, not a flag,
unless it is one of the known flags (so ``-e -1`` passes the version -1).
Missing versions: absent for insere/consulta/remove, 0 ("no version") for the
batch operations, like the Rust client.  Also accepted: ``--port``, ``--op``,
``--key``/``--chave``, ``--value``/``--valor``, ``--version``/``--versao``,
``--host`` (127.0.0.1) and ``--servers``.

Security (the Rust client has none; these are additions): ``--tls-ca PEM``,
``--tls-cert PEM``/``--tls-key PEM`` (mutual TLS), ``--token-file FILE``,
``--token TOKEN`` (visible to ``ps``: prefer the file or the environment);
defaults from $KVS_TLS_CA, $KVS_TOKEN_FILE, $KVS_TOKEN, $KVS_CLIENT_CERT/$KVS_CLIENT_KEY.

Output: one line per answer in the form of the messages, e.g.
``Versao { versao: 3 }`` and ``Tupla { chave: "k", valor: "v", versao: 3 }``.
Exit status: 0; 1 if an answer was -1 or the server was unreachable; 2 for bad flags.
"""
from __future__ import annotations

import json
import sys

from .client import BadTarget, Client, ClientError, SecurityConfigError, parse_servers, security_from

OPS = ("insere", "consulta", "remove", "insere-v", "consulta-v", "remove-v", "snapshot")
FLAGS = {
    "-p": "port", "--port": "port", "--porta": "port",
    "-o": "op", "--op": "op", "--operacao": "op",
    "-k": "keys", "--key": "keys", "--chave": "keys",
    "-v": "values", "--value": "values", "--valor": "values",
    "-e": "versions", "--version": "versions", "--versao": "versions",
    "--host": "host", "--servers": "servers",
    "--tls-ca": "tls_ca", "--tls-cert": "tls_cert", "--tls-key": "tls_key",
    "--token": "token", "--token-file": "token_file",
}
_SINGLE = ("port", "op", "host", "servers", "tls_ca", "tls_cert", "tls_key", "token", "token_file")
USAGE = ("usage: client.sh -p PORT -o insere|consulta|remove|insere-v|consulta-v|remove-v|snapshot "
         "[-k KEY...] [-v VALUE...] [-e VERSION...] [--tls-ca PEM] [--token-file FILE | --token T]")


class FlagError(ValueError):
    pass


def parse_flags(argv: list[str]) -> dict:
    opts: dict[str, list[str]] = {k: [] for k in set(FLAGS.values())}
    current: str | None = None
    for word in argv:
        name, eq, inline = word.partition("=")
        if word in FLAGS or (eq and name in FLAGS and name.startswith("--")):
            current = FLAGS[name if eq else word]
            if eq:
                opts[current].append(inline)
            continue
        if word in ("-h", "--help"):
            raise FlagError(USAGE)
        if current is None:
            raise FlagError(f"unexpected argument {word!r}\n{USAGE}")
        opts[current].append(word)
    single = {}
    for name in _SINGLE:
        vals = opts.pop(name)
        if len(vals) > 1:
            raise FlagError(f"{name} given more than once: {vals}")
        single[name] = vals[0] if vals else None
    if not single["op"]:
        raise FlagError(f"missing -o OP\n{USAGE}")
    if single["op"] not in OPS:
        raise FlagError(f"unknown operation {single['op']!r} (one of {', '.join(OPS)})")
    try:
        versions = [int(v) for v in opts["versions"]]
    except ValueError:
        raise FlagError(f"versions must be integers: {opts['versions']}") from None
    return {**single, "keys": opts["keys"], "values": opts["values"], "versions": versions}


def _versao(v: int) -> str:
    return f"Versao {{ versao: {v} }}"


def _tupla(k: str, v: str, ver: int) -> str:
    return f"Tupla {{ chave: {json.dumps(k, ensure_ascii=False)}, valor: {json.dumps(v, ensure_ascii=False)}, versao: {ver} }}"


def run(opts: dict, out=sys.stdout, err=sys.stderr) -> int:
    spec = opts["servers"] or opts["port"] or "9000"
    servers = parse_servers(spec, opts["host"] or "127.0.0.1")
    op, keys, values, versions = opts["op"], opts["keys"], opts["values"], opts["versions"]

    def ver(i: int, default):
        return versions[i] if i < len(versions) else default

    if op in ("insere", "insere-v") and len(values) != len(keys):
        raise FlagError(f"{op}: {len(keys)} key(s) but {len(values)} value(s)")
    if op not in ("snapshot",) and not keys:
        raise FlagError(f"{op}: at least one -k KEY is needed")
    security = security_from(token=opts.get("token"), token_file=opts.get("token_file"),
                             tls_ca=opts.get("tls_ca"), tls_cert=opts.get("tls_cert"),
                             tls_key=opts.get("tls_key"))
    failed = False
    with Client(servers, security=security) as client:
        def note(error: str) -> None:
            if error:
                err.write(f"kvs-error: {error}\n")

        if op == "insere":
            for k, v in zip(keys, values):
                r = client.put(k, v)
                out.write(_versao(r.version) + "\n")
                note(r.error)
                failed |= r.version <= 0
        elif op in ("consulta", "remove"):
            for i, k in enumerate(keys):
                v = ver(i, None)
                if op == "consulta":
                    r = client.get(k, v)
                    out.write(_tupla(r.key, r.value, r.version) + "\n")
                    note(r.error)
                else:
                    w = client.delete(k, v)
                    out.write(_versao(w.version) + "\n")
                    note(w.error)
                    failed |= w.version <= 0
        elif op == "insere-v":
            for r in client.mput(list(zip(keys, values))):
                out.write(_versao(r.version) + "\n")
                note(r.error)
                failed |= r.version <= 0
        elif op == "consulta-v":
            for r in client.mget([(k, ver(i, 0)) for i, k in enumerate(keys)]):
                out.write(_tupla(r.key, r.value, r.version) + "\n")
        elif op == "remove-v":
            for r in client.mdel([(k, ver(i, 0)) for i, k in enumerate(keys)]):
                out.write(_versao(r.version) + "\n")
                note(r.error)
                failed |= r.version <= 0
        elif op == "snapshot":
            rows, error = client.snapshot(ver(0, 0))
            if not rows:
                out.write(_tupla("", "", 0) + "\n")
            for r in rows:
                out.write(_tupla(r.key, r.value, r.version) + "\n")
            note(error)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(parse_flags(argv))
    except (FlagError, BadTarget, SecurityConfigError) as exc:
        print(f"client.sh: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"client.sh: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
