"""Storage: the PostgreSQL schema (migrations), the runtime queries, and the embedded cluster."""
