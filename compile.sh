#!/usr/bin/env bash
# Set up everything KVS needs; safe to run again (idempotent, non-interactive).
#   - Mosquitto (and tmux, used by the shell's tests) via apt-get when missing
#   - .venv with the pinned requirements.txt
#   - gRPC/protobuf stubs in kvs_proto/ generated from proto/kvs.proto
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    need_pkgs+=(mosquitto)
fi
if ! command -v tmux >/dev/null 2>&1; then
    need_pkgs+=(tmux)
fi
if ! command -v python3 >/dev/null 2>&1; then
    need_pkgs+=(python3)
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need_pkgs+=(python3-venv)
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -E"; fi
    echo "compile.sh: installing ${need_pkgs[*]} with apt-get" >&2
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "compile.sh: creating .venv" >&2
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt

.venv/bin/python -m grpc_tools.protoc -I kvs_proto=proto \
    --python_out=. --grpc_python_out=. --pyi_out=. proto/kvs.proto
echo "compile.sh: done (stubs in kvs_proto/, venv in .venv)" >&2
