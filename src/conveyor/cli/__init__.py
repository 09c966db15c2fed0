"""The `conveyor` command line: servers, workers, and task inspection. The only reader of env."""
