#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL 15 cluster.
#
#   scripts/with-postgres15.sh COMMAND [ARGS...]
#
# Starts a fresh cluster (initdb -A trust, 127.0.0.1 on a free port, unix socket in
# its own temp dir), exports CONVEYOR_TEST_DATABASE_URL pointing at it, runs COMMAND
# as the calling user, then stops the cluster (pg_ctl stop -m immediate) and deletes
# it, whatever happens. Exits with COMMAND's exit status.
#
# Environment:
#   PG15_BINDIR     PostgreSQL 15 binaries   (default /usr/lib/postgresql/15/bin,
#                   Debian package postgresql-15)
#   PG15_OS_USER    when run as root: the non-root user that owns and runs the
#                   server (PostgreSQL refuses to run as root). Default: `postgres`
#                   if that user exists, else `conveyor-ci`, created if missing.
#                   When not run as root, the server runs as the calling user.
#   PG15_MAX_CONNECTIONS
#                   the cluster's max_connections (default 100, PostgreSQL's own).
#                   .ci/run raises it: the test suite's processes share the cluster,
#                   each test with servers of its own, up to 23 connections each.
#   PG15_EXTRA_ARGS extra `postgres` options, word-split, for profiling (for example
#                   "-c shared_preload_libraries=pg_stat_statements"). Never set by CI.
set -euo pipefail

readonly PG15_BINDIR="${PG15_BINDIR:-/usr/lib/postgresql/15/bin}"
readonly START_ATTEMPTS=5   # a new free port is picked for each attempt

log() { printf 'with-postgres15: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ $# -eq 0 ]]; then
    die "usage: $0 COMMAND [ARGS...]"
fi

for tool in initdb pg_ctl pg_isready postgres; do
    [[ -x "$PG15_BINDIR/$tool" ]] ||
        die "$PG15_BINDIR/$tool not found; install PostgreSQL 15 (apt-get install -y postgresql-15) or set PG15_BINDIR"
done
command -v python3 >/dev/null || die "python3 is needed to pick a free port"

# --- Which OS user runs the server -------------------------------------------------
if [[ $EUID -eq 0 ]]; then
    if [[ -n "${PG15_OS_USER:-}" ]]; then
        os_user="$PG15_OS_USER"
    elif id -u postgres >/dev/null 2>&1; then
        os_user=postgres
    else
        os_user=conveyor-ci
    fi
    if ! id -u "$os_user" >/dev/null 2>&1; then
        log "creating system user $os_user"
        # Another run may create it concurrently: only fail if it still does not exist.
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$os_user" || id -u "$os_user" >/dev/null 2>&1 ||
            die "could not create user $os_user"
    fi
    [[ "$(id -u "$os_user")" -ne 0 ]] || die "PG15_OS_USER must not be a root user"
    # The temp dir must be reachable by that user: /tmp is, $TMPDIR may not be.
    tmp_parent=/tmp
else
    os_user="$(id -un)"
    tmp_parent="${TMPDIR:-/tmp}"
fi

pg_tmp="$(mktemp -d "$tmp_parent/conveyor-pg15.XXXXXX")"
pg_data="$pg_tmp/data"
pg_log="$pg_tmp/server.log"
if [[ $EUID -eq 0 ]]; then
    chown "$os_user:" "$pg_tmp"
fi

# Run a PostgreSQL tool as the server's owner, from a directory it can read
# (the caller's cwd, e.g. a clone under /root, may be closed to it).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$pg_tmp" && runuser -u "$os_user" -- "$@")
    else
        (cd "$pg_tmp" && "$@")
    fi
}

pg_pid=""   # the server process, a child of this script (so it is reaped here)

stop_server() {
    [[ -n "$pg_pid" ]] || return 0
    if kill -0 "$pg_pid" 2>/dev/null &&
        ! as_pg "$PG15_BINDIR/pg_ctl" stop -D "$pg_data" -m immediate -w -t 30 >/dev/null 2>&1; then
        # Fallback: kill our own postmaster (pid on the first line of postmaster.pid),
        # and signal its parent (runuser forwards the signal to it).
        local pid
        pid="$(head -n1 "$pg_data/postmaster.pid" 2>/dev/null || true)"
        log "pg_ctl stop failed; killing the server"
        if [[ "$pid" =~ ^[0-9]+$ ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        kill -TERM "$pg_pid" 2>/dev/null || true
    fi
    for _ in $(seq 1 20); do
        kill -0 "$pg_pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL "$pg_pid" 2>/dev/null || true
    wait "$pg_pid" 2>/dev/null || true
    pg_pid=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_server
    rm -rf -- "$pg_tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_server_log() {
    if [[ -s "$pg_log" ]]; then
        log "last lines of the PostgreSQL 15 server log:"
        tail -n "${1:-50}" "$pg_log" >&2 || true
    fi
}

# --- Create and start the cluster --------------------------------------------------
as_pg "$PG15_BINDIR/initdb" -D "$pg_data" -A trust -U "$os_user" \
    --encoding=UTF8 --no-locale >"$pg_tmp/initdb.log" 2>&1 || {
    cat "$pg_tmp/initdb.log" >&2
    die "initdb failed"
}

# PostgreSQL's own default unless the caller needs more (the benchmarks keep the default).
max_connections="${PG15_MAX_CONNECTIONS:-100}"
[[ "$max_connections" =~ ^[1-9][0-9]*$ ]] || die "PG15_MAX_CONNECTIONS must be a positive integer, got '$max_connections'"

# The socket directory goes in the config file (paths are quoted there, not by a shell).
socket_dir_conf="${pg_tmp//\'/\'\'}"
as_pg tee -a "$pg_data/postgresql.conf" >/dev/null <<EOF

# --- added by scripts/with-postgres15.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$socket_dir_conf'
max_connections = $max_connections
EOF

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Start the postmaster in the background as a child of this script (not via
# `pg_ctl start`, whose server is orphaned to PID 1), then wait for pg_isready.
# A port taken between picking and binding makes the server exit: retry on another.
port=""
for attempt in $(seq 1 "$START_ATTEMPTS"); do
    candidate="$(free_port)"
    # fsync, synchronous_commit and full_page_writes keep their durable defaults.
    as_pg "$PG15_BINDIR/postgres" -D "$pg_data" -p "$candidate" -c fsync=on \
        ${PG15_EXTRA_ARGS:-} </dev/null >>"$pg_log" 2>&1 &
    pg_pid=$!
    for _ in $(seq 1 120); do
        if "$PG15_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$candidate" -d postgres \
            -U "$os_user" -t 2; then
            port="$candidate"
            break
        fi
        kill -0 "$pg_pid" 2>/dev/null || break   # the server exited
        sleep 0.5
    done
    [[ -z "$port" ]] || break
    log "start attempt $attempt on port $candidate failed"
    show_server_log 20
    stop_server
done
[[ -n "$port" ]] || die "PostgreSQL 15 did not become ready after $START_ATTEMPTS attempts"

export CONVEYOR_TEST_DATABASE_URL="postgresql://$os_user@127.0.0.1:$port/postgres"
log "PostgreSQL $("$PG15_BINDIR/postgres" --version | awk '{print $3}') ready at $CONVEYOR_TEST_DATABASE_URL (data: $pg_data)"

# --- Run the command ---------------------------------------------------------------
status=0
"$@" || status=$?
if [[ $status -ne 0 ]]; then
    log "command exited with status $status"
    show_server_log 40
fi
exit "$status"   # the EXIT trap stops the cluster and removes $pg_tmp
