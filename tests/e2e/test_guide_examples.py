"""The Python examples of docs/getting-started.md and README.md, run as written against a
real server and worker.

The worker module ("Writing a worker"), the Client example and the AsyncClient example
("The Python client") are taken from the guide, and the README's worker module and producer
from the README, with only their placeholder addresses replaced, so neither can drift from
what the library does: an example that no longer runs, or a comment that says a line prints
what it does not, fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from helpers import REPO_ROOT, conveyor_command, process_env, wait_final, wait_for

if TYPE_CHECKING:
    from pathlib import Path

GUIDE = REPO_ROOT / "docs" / "getting-started.md"
README = REPO_ROOT / "README.md"

# A print whose comment says what it prints: `print(...)  # what it prints`.
COMMENTED_PRINT = re.compile(r"^\s*print\(.*\)  # (?P<printed>.+)$", re.MULTILINE)


def python_block(document: Path, marker: str) -> str:
    """The one ```python block of `document` that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", document.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} python blocks of {document.name} contain {marker!r}"
    return found[0]


def guide_block(marker: str) -> str:
    """The one ```python block of the guide that contains `marker`."""
    return python_block(GUIDE, marker)


def run_worker_module(
    source: str, server_address: str, tmp_path: Path, processes: Any, name: str
) -> None:
    """`conveyor worker myapp.tasks:worker` with `source` as myapp/tasks.py."""
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(source)
    processes(
        conveyor_command("worker", "myapp.tasks:worker", "--server", server_address),
        name=name,
        PYTHONPATH=os.pathsep.join([str(tmp_path), process_env()["PYTHONPATH"]]),
    )


def run_python(source: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", source],
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_python_client_examples_run_and_print_what_their_comments_say(
    server, processes, tmp_path
):
    """The guide's Client example printed `succeeded ...`, not the `TaskState.SUCCEEDED ...`
    its comment said (TaskState is a StrEnum), and its AsyncClient example only defined
    `main()`: run as written, it did nothing."""
    run_worker_module(
        guide_block("worker = Worker("), server.address, tmp_path, processes, "guide-worker"
    )

    example = guide_block('with Client("localhost:50051") as client:')
    said = [match["printed"] for match in COMMENTED_PRINT.finditer(example)]
    assert said, "the Client example has no commented print to check"
    printed = run_python(example.replace("localhost:50051", server.address)).stdout
    lines = printed.splitlines()
    # The commented prints come first (the history lines and the last one follow).
    assert lines[: len(said)] == said, printed
    assert lines[-1].startswith("too late: task "), printed
    assert lines[-1].endswith(" already finished (succeeded)"), printed

    example = guide_block("async with AsyncClient(")
    printed = run_python(example.replace("localhost:50051", server.address)).stdout
    # As its comment says: the worker may have taken the task already.
    assert printed.strip() in {"queued", "running"}, printed


@pytest.mark.slow
def test_the_readme_worker_module_enqueues_nothing_and_its_producer_runs(
    server, processes, client, tmp_path
):
    """The README's one example put the Worker and a `with Client(...)` producer in the module
    it said to run with `conveyor worker myapp.tasks:worker`: every worker start enqueued a
    task. The worker module now only defines the worker; the producer is apart."""
    worker_module = python_block(README, "worker = Worker(")
    run_worker_module(
        worker_module.replace("localhost:50051", server.address),
        server.address,
        tmp_path,
        processes,
        "readme-worker",
    )
    # The worker imported its module before it registered.
    wait_for(client.list_workers, what="the README's worker to register")
    assert client.list_tasks().tasks == (), "importing the worker's module enqueued tasks"

    producer = python_block(README, "with Client(")
    printed = run_python(producer.replace("localhost:50051", server.address)).stdout
    assert printed.strip() in {"queued", "running", "succeeded"}, printed
    (task,) = client.list_tasks().tasks
    assert wait_final(client, task.id).result == b"sent"
