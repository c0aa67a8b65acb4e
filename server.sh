#!/usr/bin/env bash
# Run one KVS server with gRPC on PORT:  ./server.sh PORT [extra server flags]
# Broker: KVS_MQTT_HOST (default localhost) / KVS_MQTT_PORT (default 1883);
# data directory: KVS_DATA_DIR when set (the server reads these itself).
set -euo pipefail
if [ "$#" -lt 1 ]; then
    echo "usage: $0 PORT [--mqtt-host H] [--mqtt-port N] [--data-dir D] [--node-id ID] ..." >&2
    exit 2
fi
cd "$(dirname "$0")"
PORT="$1"; shift
exec .venv/bin/python -m server --port "$PORT" "$@"
