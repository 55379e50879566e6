"""serve_app/policy holds pure decisions: it must import neither ray nor vllm."""

from __future__ import annotations

import ast

from tests.conftest import REPO

FORBIDDEN = ("ray", "vllm", "torch", "starlette")


def test_policy_modules_import_no_runtime() -> None:
    files = sorted((REPO / "serve_app" / "policy").glob("*.py"))
    assert files, "serve_app/policy is missing"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
