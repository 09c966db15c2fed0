"""The `conveyor` command line: servers, workers, and task inspection. The only reader of env.

(gRPC's own logging is kept at ERROR by the `conveyor` package, which is imported, with
grpc, before this one.)
"""
