"""``python -m kvs_shell``: interactive shell, one-shot commands, scripts and pipes."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .client import (CONSISTENCY_LEVELS, DEFAULT_PORT, LOCAL, BadTarget, SecurityConfigError,
                     parse_servers, security_from, set_default_security)
from .formatters import FORMATS

SERVERS_ENV = "KVS_SHELL_SERVERS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvs_shell",
        description="Shell for the KVS replicated multi-version key-value store.",
        epilog="Without -c/--file: an interactive shell when stdin and stdout are terminals, "
               "else commands are read from stdin, one result per line. Exit status: 1 if "
               "any command failed (invalid input, -1 from the server, unreachable server).")
    target = p.add_mutually_exclusive_group()
    target.add_argument("-p", "--port", type=int, help="port of one server (on --host)")
    target.add_argument("-s", "--servers",
                        help="several servers: 9000,9001,9002 or host:port,... "
                             "(round robin with failover)")
    p.add_argument("-H", "--host", default="127.0.0.1", help="host of the server(s) (127.0.0.1)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("-c", "--command", dest="commands", metavar="CMDS",
                     help='run these commands and exit, e.g. -c "put k1 v1; get k1"')
    run.add_argument("-f", "--file", help="run the commands in this file (- for stdin) and exit")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: table on a terminal, plain otherwise)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="in scripts and pipes, keep going after a failed command")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (5)")
    p.add_argument("--consistency", choices=CONSISTENCY_LEVELS, default=LOCAL,
                   help="how get/mget/snapshot read: local (the answering server's state, "
                        "default) or linearizable (confirmed with a quorum; see `help consistency`)")
    p.add_argument("--timing", action="store_true", help="show the time each command took")
    p.add_argument("--no-color", action="store_true", help="never use colours")
    add_security_flags(p)
    return p


def add_security_flags(p: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key/--token/--token-file (shared with client.sh)."""
    g = p.add_argument_group(
        "security", "defaults from the environment: $KVS_TLS_CA, $KVS_TOKEN_FILE or $KVS_TOKEN, "
                    "$KVS_CLIENT_CERT/$KVS_CLIENT_KEY (`. run/client.env` sets them for the "
                    "local cluster)")
    g.add_argument("--tls-ca", metavar="PEM", help="connect with TLS; trust servers signed by this CA")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate (servers requiring mutual TLS)")
    g.add_argument("--tls-key", metavar="PEM", help="its private key")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="name the server certificate must carry (default: the host given)")
    g.add_argument("--token-file", metavar="FILE", help="send the bearer token in this file")
    g.add_argument("--token", help="send this bearer token (visible to `ps`: prefer --token-file "
                                   "or $KVS_TOKEN)")


def configure_security(args: argparse.Namespace) -> None:
    """Sets the security every Client of this process uses (flags, then environment)."""
    set_default_security(security_from(
        token=args.token, token_file=args.token_file, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, server_name=args.tls_server_name))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.port is not None:
        spec = str(args.port)
    elif args.servers:
        spec = args.servers
    else:
        spec = os.environ.get(SERVERS_ENV) or str(DEFAULT_PORT)
    try:
        servers = parse_servers(spec, args.host)
        configure_security(args)
    except (BadTarget, SecurityConfigError) as exc:
        print(f"kvs_shell: {exc}", file=sys.stderr)
        return 2

    out_tty = sys.stdout.isatty()
    interactive = (args.commands is None and args.file is None
                   and sys.stdin.isatty() and out_tty)
    fmt = args.format or ("table" if out_tty else "plain")
    if fmt == "table" and not out_tty:
        fmt = "plain"  # stdout is not a terminal: no tables, no colours
    color = out_tty and not args.no_color and not os.environ.get("NO_COLOR")

    from .app import Shell
    try:
        shell = Shell(servers, fmt=fmt, timeout=args.timeout, interactive=interactive,
                      color=color, continue_on_error=args.continue_on_error,
                      default_host=args.host, consistency=args.consistency)
    except BadTarget as exc:
        print(f"kvs_shell: {exc}", file=sys.stderr)
        return 2
    shell.timing = args.timing
    if not interactive:
        # SIGTERM ends a script like Ctrl-C: a running watch stops cleanly (exit 0)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.commands is not None:
            return shell.run_lines([args.commands])
        if args.file is not None:
            if args.file == "-":
                return shell.run_lines(sys.stdin, "<stdin>")
            try:
                with open(args.file, encoding="utf-8") as fh:
                    return shell.run_lines(fh, args.file)
            except OSError as exc:
                print(f"kvs_shell: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
                return 2
        if interactive:
            return shell.run_interactive()
        return shell.run_lines(sys.stdin)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1 if shell.failed else 0
    finally:
        shell.close()


if __name__ == "__main__":
    sys.exit(main())
