"""The package's layers keep to their rooms: each package imports only what its layer may know.

Read from the source (every import statement, at any depth, lazy ones inside functions included), so a
forbidden edge fails here with the file, the line and the import, before it can tangle the layers.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "leanserve"

# package -> modules it must not import (a name matches itself and everything under it)
FORBIDDEN = {
    "scheduler": ("torch", "leanserve.engine", "leanserve.kernels", "leanserve.server"),
    "engine": ("leanserve.server",),
    "kernels": ("leanserve.engine", "leanserve.scheduler", "leanserve.server"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def forbidden_edges() -> list[str]:
    edges = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for line, module in imports(path):
                if any(module == b or module.startswith(b + ".") for b in banned):
                    edges.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} ({layer} may not)")
    return edges


def test_no_layer_imports_what_it_must_not_know():
    assert forbidden_edges() == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    fake = tmp_path / "leanserve"
    (fake / "scheduler").mkdir(parents=True)
    (fake / "scheduler" / "bad.py").write_text(
        "import os\n\ndef f():\n    from ..engine import llm\n    import torch.nn\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert forbidden_edges() == ["leanserve/scheduler/bad.py:4 imports leanserve.engine (scheduler may not)",
                                 "leanserve/scheduler/bad.py:5 imports torch.nn (scheduler may not)"]


def test_the_scheduler_runs_where_torch_cannot_be_imported():
    # torch made unimportable: the scheduler, the block manager and the request still load and schedule.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from leanserve.params import SamplingParams\n"
            "from leanserve.scheduler.block_manager import BlockManager\n"
            "from leanserve.scheduler.request import Request\n"
            "from leanserve.scheduler.scheduler import Scheduler\n"
            "s = Scheduler(BlockManager(8, 4), 4, 16)\n"
            "s.add(Request('a', [1, 2, 3], SamplingParams()), 8)\n"
            "assert s.schedule().num_tokens == [3]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
