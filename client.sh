#!/usr/bin/env bash
# The course Rust client's flags on the Python client (same RPCs):
#   ./client.sh -p PORT -o insere|consulta|remove|insere-v|consulta-v|remove-v|snapshot -k K... -v V... -e VER...
# Several keys/values/versions: repeat the flag (-k a -k b) or list them after one flag (-k a b).
set -euo pipefail
cd "$(dirname "$0")"
exec .venv/bin/python -m kvs_shell.compat "$@"
