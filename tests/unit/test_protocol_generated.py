"""The committed protobuf code matches conveyor.proto (regenerate with `make proto`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PROTO = Path("conveyor/protocol/v1/conveyor.proto")
GENERATED = ["conveyor_pb2.py", "conveyor_pb2.pyi", "conveyor_pb2_grpc.py", "conveyor_pb2_grpc.pyi"]


class TestGeneratedCode:
    def test_generated_code_is_up_to_date(self, tmp_path: Path) -> None:
        """protoc's output today equals what is committed."""
        if shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent)) is None:
            pytest.fail("protoc-gen-mypy is missing: install the dev extras (make install)")
        (tmp_path / PROTO.parent).mkdir(parents=True)
        shutil.copy(SRC / PROTO, tmp_path / PROTO)
        env_path = f"{Path(sys.executable).parent}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{tmp_path}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                f"--mypy_out={tmp_path}",
                f"--mypy_grpc_out={tmp_path}",
                str(tmp_path / PROTO),
            ],
            check=True,
            env={"PATH": env_path},
            capture_output=True,
        )
        for name in GENERATED:
            fresh = (tmp_path / PROTO.parent / name).read_text()
            committed = (SRC / PROTO.parent / name).read_text()
            assert fresh == committed, f"{name} is stale: run `make proto`"

    def test_package_is_versioned(self) -> None:
        """The wire contract lives in package conveyor.v1 (versioned, never bare)."""
        text = (SRC / PROTO).read_text()
        assert "package conveyor.v1;" in text
