"""Generated gRPC/protobuf stubs for proto/kvs.proto (made by ./compile.sh, not committed)."""
