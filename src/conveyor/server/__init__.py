"""The Conveyor server: gRPC services and maintenance loops in front of one PostgreSQL."""
