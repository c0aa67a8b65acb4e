"""kvs_shell: the interactive shell (prompt_toolkit + rich) and scripting client of KVS.

Modules: client (typed gRPC client, the only grpc user), commands (command table),
parser (line splitting), completer, lexer, render (table/plain/json), app (the shell),
compat (the course client's ``client.sh`` flags), __main__ (``python -m kvs_shell``).
"""
__all__ = ["main"]


def main(argv=None) -> int:
    from .__main__ import main as _main
    return _main(argv)
