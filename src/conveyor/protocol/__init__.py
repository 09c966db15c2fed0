"""The gRPC wire contract (`v1/conveyor.proto`), its generated code, and the hand-written glue."""
