"""The dependency direction, checked on the source: process packages may import the library, the library never
imports a process package, only the tools (the `disagg` command) may import anything, and no serving package, the
tools included, imports the benchmarks (`disagg bench` reaches them through an entry point)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROCESS_PACKAGES = ("gateway", "prefill_worker", "decode_worker")
SERVING_PACKAGES = ("disagg", *PROCESS_PACKAGES)
# Within the library, what each room may not import (besides the process packages, which no room may).
FORBIDDEN = {
    "disagg.model": ("disagg.engine", "disagg.rpc", "disagg.telemetry", "disagg.tools"),
    "disagg.kv": ("disagg.engine", "disagg.tools"),
    "disagg.engine": ("disagg.rpc", "disagg.tools"),
    "disagg.telemetry": ("disagg.engine", "disagg.tools"),
    "disagg.rpc": ("disagg.tools",),
    "disagg.config": ("disagg.engine", "disagg.rpc", "disagg.telemetry", "disagg.tools"),
    "disagg.errors": ("disagg.",),
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _within(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def layering_violations(root: pathlib.Path) -> list[str]:
    """`file:line imports module` for every import against the layering, in the tree under `root`."""
    violations = []
    for path in sorted((root / "disagg").rglob("*.py")):
        module = _module_name(root, path)
        if _within(module, "disagg.tools") or _within(module, "disagg.pb"):
            continue
        forbidden = [*PROCESS_PACKAGES, *(f for room, fs in FORBIDDEN.items() if _within(module, room) for f in fs)]
        for line, imported in _imports(path):
            if any(_within(imported, f) for f in forbidden):
                violations.append(f"{path.relative_to(root)}:{line} imports {imported}")
    for package in PROCESS_PACKAGES:  # and the processes never import each other
        for path in sorted((root / package).rglob("*.py")):
            others = [p for p in PROCESS_PACKAGES if p != package]
            for line, imported in _imports(path):
                if any(_within(imported, other) for other in others):
                    violations.append(f"{path.relative_to(root)}:{line} imports {imported}")
    for package in SERVING_PACKAGES:  # the measurement harness stays outside what is served, even lazily
        for path in sorted((root / package).rglob("*.py")):
            for line, imported in _imports(path):
                if _within(imported, "benchmarks"):
                    violations.append(f"{path.relative_to(root)}:{line} imports {imported}")
    return violations


def test_the_library_never_imports_a_process_package():
    assert layering_violations(ROOT) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "disagg/kv/planted.py",
            "from decode_worker.servicer import X\n",
            "disagg/kv/planted.py:1 imports decode_worker.servicer",
        ),
        (
            "disagg/model/planted.py",
            "def f():\n    import disagg.engine.decode\n",
            "disagg/model/planted.py:2 imports disagg.engine.decode",
        ),
        ("gateway/planted.py", "import prefill_worker.main\n", "gateway/planted.py:1 imports prefill_worker.main"),
        (
            "disagg/tools/planted.py",
            "def f():\n    from benchmarks.serving import bench_main\n",
            "disagg/tools/planted.py:2 imports benchmarks.serving",
        ),
        ("decode_worker/planted.py", "import benchmarks\n", "decode_worker/planted.py:1 imports benchmarks"),
    ],
)
def test_the_check_catches_a_planted_violation(tmp_path, module, source, expected):
    for package in ("disagg", *PROCESS_PACKAGES):
        (tmp_path / package).mkdir()
    (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / module).write_text(source)
    assert layering_violations(tmp_path) == [expected]
