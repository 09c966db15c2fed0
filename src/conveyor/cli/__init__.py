"""The `conveyor` command line: servers, workers, and task inspection. The only reader of env.

gRPC's C core prints INFO lines of its own (for instance when the embedded PostgreSQL's
pg_ctl forks); the CLI keeps gRPC's own logging at ERROR unless the user set
GRPC_VERBOSITY. This must happen before grpc is imported, hence here.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
