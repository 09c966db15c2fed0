"""Structural rules of the codebase, checked rather than hoped for.

Imports flow one way: `types`, `errors`, `breaker`, `group_commit`, `metric_children` and
`http_refusal` are leaves; `logs` needs only `errors` and `types`, `codec` only `errors`,
`auth` only `errors` and `types`; `storage` and `protocol` import only leaves; `client`
and `worker` never import `storage` or `server`; `monitoring` imports only leaves, `auth`
and `codec`; `cli` sits on top. SQL lives only in `storage/`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "conveyor"

# layer -> the conveyor layers it may import (besides itself)
ALLOWED = {
    # How every view writes a time, and whether text can travel: below everything.
    "text": set(),
    "types": {"errors", "text"},
    "errors": set(),
    "breaker": {"errors", "types"},
    # types imports only errors: no cycle.
    "logs": {"errors", "types"},
    "group_commit": set(),
    "metric_children": set(),
    "http_refusal": set(),
    "event_loop": set(),
    "auth": {"errors", "types"},
    "codec": {"errors"},
    "storage": {"types", "errors", "logs"},
    "protocol": {"types", "errors", "logs"},
    "monitoring": {
        *("types", "errors", "logs", "auth", "codec", "metric_children", "http_refusal", "text"),
    },
    "client": {
        *("types", "errors", "logs", "breaker", "group_commit", "protocol", "codec", "auth"),
        "text",
    },
    "worker": {
        *("types", "errors", "logs", "breaker", "group_commit", "protocol", "client"),
        *("codec", "auth", "metric_children", "event_loop", "http_refusal"),
    },
    "server": {
        *("types", "errors", "logs", "breaker", "group_commit", "protocol", "storage"),
        *("monitoring", "auth", "codec", "metric_children", "text"),
    },
    "cli": {
        *("types", "errors", "logs", "breaker", "group_commit", "protocol", "storage"),
        *("monitoring", "client", "worker", "server", "auth", "codec", "event_loop", "text"),
    },
}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def conveyor_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "conveyor" and len(parts) > 1:
                found.add(parts[1])
    return found


def source_files() -> list[Path]:
    """Every hand-written module in a layer (the package root re-exports, so it is exempt)."""
    layered = [path for path in PACKAGE.rglob("*.py") if "_pb2" not in path.name]
    return [
        path
        for path in layered
        if path.parent != PACKAGE
        or path.name
        in {
            *("types.py", "errors.py", "breaker.py", "logs.py", "group_commit.py"),
            *("auth.py", "codec.py", "http_refusal.py"),
        }
    ]


class TestImportDirection:
    @pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
    def test_module_imports_only_lower_layers(self, path: Path) -> None:
        """Each module imports only the layers its own layer may depend on."""
        layer = layer_of(path)
        assert layer in ALLOWED, f"unknown layer {layer}: add it to ALLOWED"
        forbidden = conveyor_imports(path) - ALLOWED[layer] - {layer, "__version__"}
        assert not forbidden, f"{path.name} ({layer}) imports {sorted(forbidden)}"


SQL_KEYWORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM)\s", re.IGNORECASE)


class TestSqlLivesInStorage:
    def test_no_sql_outside_the_storage_package(self) -> None:
        """SQL text appears only in storage/ (queries.sql, migrations, migrate.py)."""
        offenders = [
            f"{path.relative_to(PACKAGE)}: {node.value[:60]!r}"
            for path in PACKAGE.rglob("*.py")
            if "storage" not in path.parts and "_pb2" not in path.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and SQL_KEYWORDS.search(node.value)
        ]
        assert not offenders

    def test_every_named_query_has_a_function(self) -> None:
        """queries.py exposes one function per `-- name:` block, and no block is orphaned."""
        from conveyor.storage import queries  # noqa: PLC0415

        missing = [name for name in queries.SQL if not callable(getattr(queries, name, None))]
        assert not missing

    def test_every_module_has_a_docstring(self) -> None:
        """Each module opens with a paragraph saying what it owns."""
        undocumented = [
            str(path.relative_to(PACKAGE))
            for path in PACKAGE.rglob("*.py")
            if "_pb2" not in path.name and not ast.get_docstring(ast.parse(path.read_text()))
        ]
        assert not undocumented


class TestOneSpelling:
    def test_the_unprintable_categories_are_spelled_only_in_types(self) -> None:
        """What no worker text may hold, and what a log line escapes, is one set.

        logs.py kept a copy of `types.UNPRINTABLE_CATEGORIES` (logs could import only
        errors); two copies drift apart, and a character one refuses the other would print.
        """
        spelled = sorted(
            str(path.relative_to(PACKAGE))
            for path in source_files()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value == "Zl"
        )
        assert spelled == ["types.py"]

    def test_the_largest_port_is_defined_only_in_the_protocol_limits(self) -> None:
        """The client's address check and the server's URL check each had a `MAX_PORT`."""
        defined = sorted(
            str(path.relative_to(PACKAGE))
            for path in source_files()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name) and target.id == "MAX_PORT"
        )
        assert defined == ["protocol/limits.py"]


class TestNoUnsafeDeserialisation:
    # Payloads are opaque bytes to the server, and nothing in Conveyor turns bytes from the
    # wire or the database into objects: pickle, marshal and shelve would execute them.
    UNSAFE = frozenset({"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"})

    @pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
    def test_no_module_imports_a_deserialiser_that_runs_code(self, path: Path) -> None:
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & self.UNSAFE, f"{path.name} imports {imported & self.UNSAFE}"
