"""Generated protobuf stubs of the fedlens.v1 wire contract (see protos/)."""
