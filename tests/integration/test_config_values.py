"""Settings that were accepted and then crashed the process, or were silently ignored."""

from __future__ import annotations

import pytest
from helpers import run_cli as run
from helpers import server_argv

from conveyor import Worker
from conveyor.errors import ConfigError


def assert_no_traceback_error(result) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


class TestServerFlags:
    def test_max_concurrent_rpcs_beyond_a_c_int(self, database_url):
        """`--max-concurrent-rpcs 3000000000` passed IntRange(min=1) and ServerConfig (no
        upper bound), then grpc's _ConcurrentRpcLimiter raised OverflowError: a traceback
        after the database pools had been opened."""
        result = run(*server_argv(database_url, "--max-concurrent-rpcs", "3000000000"), timeout=60)
        err = assert_no_traceback_error(result)
        assert "--max-concurrent-rpcs" in err or "max_concurrent_rpcs" in err, err

    @pytest.mark.parametrize(
        ("args", "env", "named"),
        [
            (("--grpc-listen", "127.0.0.1:70000"), {}, "--grpc-listen"),
            (("--http-listen", "127.0.0.1"), {}, "--http-listen"),
            ((), {"CONVEYOR_METRICS_LISTEN": "bad"}, "metrics"),
        ],
        ids=["grpc-port-out-of-range", "http-no-port", "metrics-env"],
    )
    def test_a_bad_listen_address_names_its_option(self, database_url, args, env, named):
        """The line was "error: expected HOST:PORT, got '127.0.0.1:70000'", not saying which
        of the three addresses (one of them perhaps from the environment)."""
        base = {
            "--grpc-listen": "127.0.0.1:0",
            "--http-listen": "127.0.0.1:0",
            **dict(zip(args[::2], args[1::2], strict=True)),
        }
        argv = ["server", "--database-url", database_url]
        for flag, value in base.items():
            argv += [flag, value]
        result = run(*argv, timeout=60, **env)
        err = assert_no_traceback_error(result)
        assert named in err, err


class TestSilentlyIgnored:
    def test_conveyor_tls_with_an_unknown_value_is_not_plain_text(self, server):
        """CONVEYOR_TLS=required (anything but 1/true/yes/on) was read as "no TLS": the
        command talked plain text to the server and succeeded, the setting dropped."""
        result = run("enqueue", "demo.echo", "--server", server.address, CONVEYOR_TLS="required")
        assert result.returncode != 0, (
            "CONVEYOR_TLS=required was ignored: the task was enqueued over plain text "
            f"({result.stdout.strip()})"
        )
        assert "CONVEYOR_TLS" in result.stderr

    def test_conveyor_event_loop_with_an_unknown_value_is_said(self, database_url, processes):
        """CONVEYOR_EVENT_LOOP=asycnio (a typo of the one documented value) silently ran
        uvloop: no error, no warning."""
        from helpers import ServerProcess, wait_for  # noqa: PLC0415

        server = ServerProcess(processes, database_url, name="server-loop")
        server.process = processes(server.argv(), name="server-loop", CONVEYOR_EVENT_LOOP="asycnio")
        server.generation = 1

        def settled() -> bool:
            return server.process.process.poll() is not None or server.ready()

        wait_for(settled, timeout=60, interval=0.05, what="the server to start or refuse")
        assert "CONVEYOR_EVENT_LOOP" in server.process.output()


class TestWorkerConstructor:
    def test_a_worker_id_that_is_not_text_is_a_config_error(self, server):
        """Worker(worker_id="a\\udcff") was accepted (a lone surrogate was not in
        UNPRINTABLE_CATEGORIES) and `start` then failed with a raw UnicodeEncodeError when
        the registration was serialised."""
        with pytest.raises(ConfigError, match="worker_id"):
            Worker(server.address, worker_id="w\udcff")
