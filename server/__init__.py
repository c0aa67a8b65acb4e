"""KVS server: a replicated, multi-version key-value store."""
