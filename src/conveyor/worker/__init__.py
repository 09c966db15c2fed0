"""The worker framework: handler registry, task context, and the runtime that leases and runs."""
