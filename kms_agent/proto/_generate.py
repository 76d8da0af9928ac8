"""Regenerate the committed gRPC modules from ``kms_v2.proto``.

    python -m kms_agent.proto._generate [OUT_DIR]

Runs grpcio-tools' protoc (messages, their ``.pyi`` types and the gRPC service), adds headers
that exempt generated code from lint and strict typing, writes a ``.pyi`` for the gRPC module
(protoc does not), and formats everything with ruff so ``ruff format --check`` stays clean.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = "kms_agent/proto/kms_v2.proto"
HEADER = (
    "# ruff: noqa\n# mypy: ignore-errors\n"
    "# Generated from kms_v2.proto by kms_agent/proto/_generate.py. DO NOT EDIT.\n"
)
GENERATED = ("kms_v2_pb2.py", "kms_v2_pb2.pyi", "kms_v2_pb2_grpc.py", "kms_v2_pb2_grpc.pyi")

GRPC_STUB = """\
# Generated from kms_v2.proto by kms_agent/proto/_generate.py. DO NOT EDIT.
from typing import Any

from kms_agent.proto import kms_v2_pb2

class KeyManagementServiceStub:
    def __init__(self, channel: Any) -> None: ...
    Status: Any
    Decrypt: Any
    Encrypt: Any

class KeyManagementServiceServicer:
    def Status(self, request: kms_v2_pb2.StatusRequest, context: Any) -> Any: ...
    def Decrypt(self, request: kms_v2_pb2.DecryptRequest, context: Any) -> Any: ...
    def Encrypt(self, request: kms_v2_pb2.EncryptRequest, context: Any) -> Any: ...

def add_KeyManagementServiceServicer_to_server(servicer: Any, server: Any) -> None: ...
"""


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(ROOT / PROTO),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        gen = Path(tmp) / "kms_agent" / "proto"
        (gen / "kms_v2_pb2_grpc.pyi").write_text(GRPC_STUB)
        for name in GENERATED:
            text = (gen / name).read_text()
            if not text.startswith("# Generated from kms_v2.proto"):
                text = HEADER + text
            elif name.endswith(".pyi"):
                text = "# ruff: noqa\n" + text
            (gen / name).write_text(text)
        ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
        subprocess.run(  # noqa: S603 - fixed argv
            [ruff, "format", "--quiet", *(str(gen / n) for n in GENERATED)], check=True, cwd=ROOT
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(gen / name, out_dir / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
