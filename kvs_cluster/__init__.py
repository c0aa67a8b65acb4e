"""Launch local KVS clusters (Mosquitto broker + KVS servers) for tests, benchmarks and demos."""
from .launcher import (HOST, PROJECT_ROOT, Broker, Cluster, Server, free_port, mosquitto_binary,
                       port_open)
from .security import Security

__all__ = ["HOST", "PROJECT_ROOT", "Broker", "Cluster", "Server", "free_port", "mosquitto_binary",
           "port_open", "Security"]
