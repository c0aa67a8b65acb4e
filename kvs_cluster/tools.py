"""Where the Mosquitto programs are (a leaf module: launcher and security both use it)."""
from __future__ import annotations

import os
import shutil


def find_tool(name: str, fallback: str) -> str:
    """A Mosquitto program on PATH or at Debian's path (sbin is not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    if os.access(fallback, os.X_OK):
        return fallback
    raise FileNotFoundError(f"{name} not found: run ./compile.sh (apt-get install mosquitto)")


def mosquitto_binary() -> str:
    return find_tool("mosquitto", "/usr/sbin/mosquitto")


def mosquitto_passwd_binary() -> str:
    return find_tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
