"""Generated protobuf and gRPC code for conveyor.v1 (regenerate with `make proto`)."""
