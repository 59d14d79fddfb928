"""The dependency direction, checked on the source.

The packages form layers (docs/architecture.md, "Library layers"): the library's packages at the bottom, then the
processes, the `disagg` command that runs them, and the benchmarks on top. Each package may import only the layers
below its own, so the package graph is a DAG, with no exceptions: the library never imports a process, the
processes never import each other, and nothing that serves imports the benchmarks (`disagg bench` reaches them
through an entry point). Imports count wherever they are: inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Bottom first: a package may import packages of lower layers only (not one of its own layer).
LAYERS: list[tuple[str, ...]] = [
    ("disagg", "disagg.errors", "disagg.pb"),  # the empty package itself; domain errors; generated protos
    ("disagg.config",),  # every process's options: no torch, nothing of the library above
    ("disagg.model",),  # the model math: forward passes, the paged KV pool they run over, sampling
    ("disagg.kv",),  # the KV cache as workers keep and ship it: codec, framing, budget, prefix cache
    ("disagg.engine",),  # the batching loops that own a worker's model
    ("disagg.rpc",),  # gRPC plumbing: channels, interceptors, services, proto conversions
    ("disagg.telemetry",),  # traces and metrics, observing RPCs through disagg.rpc's handler wrapping
    ("disagg.handoff", "disagg.server"),  # the KV transports between workers; every process's gRPC server
    ("gateway", "prefill_worker", "decode_worker"),  # the processes
    ("disagg.tools",),  # the `disagg` command, which runs the processes
    ("disagg.__main__",),
    ("benchmarks",),  # the measurement harness
]
LAYER_OF = {package: index for index, layer in enumerate(LAYERS) for package in layer}
TOP_LEVEL = ("disagg", "gateway", "prefill_worker", "decode_worker", "benchmarks")  # the folders checked


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth; `from disagg import x` imports the library's package `disagg.x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "disagg" and node.level == 0:
            found += [(node.lineno, f"disagg.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def package_of(root: pathlib.Path, module: str) -> str | None:
    """The package (a node of the graph) that `module` belongs to: `disagg.<x>` for a subpackage or a top-level
    module of the library, `disagg` for a name in the library's package itself, the top-level folder otherwise;
    None for what is not ours (the standard library, torch, ...)."""
    parts = module.split(".")
    if parts[0] != "disagg":
        return parts[0] if parts[0] in TOP_LEVEL else None
    if len(parts) > 1 and ((root / "disagg" / parts[1]).is_dir() or (root / "disagg" / f"{parts[1]}.py").exists()):
        return f"disagg.{parts[1]}"
    return "disagg"


def _files(root: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """Each Python file of the checked folders, with its package."""
    files = []
    for folder in TOP_LEVEL:
        for path in sorted((root / folder).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            package = package_of(root, module)
            assert package is not None
            files.append((path, package))
    return files


def package_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """The package graph: for each package, the other packages its files import."""
    graph: dict[str, set[str]] = {}
    for path, package in _files(root):
        imported = {package_of(root, name) for _, name in _imports(path)}
        graph.setdefault(package, set()).update(p for p in imported if p is not None and p != package)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one package (each sorted), sorted: [] for a DAG."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layering_violations(root: pathlib.Path) -> list[str]:
    """`file:line imports module` for every import of a package that is not in a lower layer than the importer's,
    in the tree under `root`, and a line for each package that is in no layer."""
    files = _files(root)
    unplaced = sorted({package for _, package in files if package not in LAYER_OF})
    violations = [f"{package} is in no layer of tests/test_layering.py's LAYERS" for package in unplaced]
    for path, package in files:
        for line, imported in _imports(path):
            target = package_of(root, imported)
            if target is None or target == package or target not in LAYER_OF or package not in LAYER_OF:
                continue
            if LAYER_OF[target] >= LAYER_OF[package]:
                violations.append(f"{path.relative_to(root)}:{line} imports {imported}")
    return violations


def test_every_import_follows_the_layers():
    assert layering_violations(ROOT) == []


def test_the_package_graph_is_acyclic():
    graph = package_graph(ROOT)
    assert cycles(graph) == []
    assert set(graph) <= set(LAYER_OF)  # and every package is placed (the test above says where it is not)


def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    """A tree with every layer's package (an empty folder, or an empty module for the library's top-level modules)
    and `files`."""
    for layer in LAYERS:
        for package in layer:
            (tmp_path / package.replace(".", "/")).mkdir(parents=True, exist_ok=True)
    for module in ("errors", "config", "server", "__main__"):
        (tmp_path / "disagg" / module).rmdir()
        (tmp_path / "disagg" / f"{module}.py").write_text("")
    for module, source in files.items():
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text(source)
    return tmp_path


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
        (
            "disagg/kv/planted.py",
            "from disagg import handoff\n",  # a package imported by name from the library's package
            "disagg/kv/planted.py:1 imports disagg.handoff",
        ),
        (
            "disagg/handoff/planted.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from disagg.server import Server\n",
            "disagg/handoff/planted.py:3 imports disagg.server",  # its own layer, not below it
        ),
        (
            "disagg/config.py",
            "from disagg.model.dtypes import DTYPES\n",
            "disagg/config.py:1 imports disagg.model.dtypes",
        ),
        ("disagg/newcomer/planted.py", "", "disagg.newcomer is in no layer of tests/test_layering.py's LAYERS"),
        ("gateway/planted.py", "import prefill_worker.main\n", "gateway/planted.py:1 imports prefill_worker.main"),
        (
            "decode_worker/planted.py",
            "from disagg.tools import cli\n",
            "decode_worker/planted.py:1 imports disagg.tools",
        ),
        (
            "disagg/tools/planted.py",
            "def f():\n    from benchmarks.serving import bench_main\n",
            "disagg/tools/planted.py:2 imports benchmarks.serving",
        ),
        ("decode_worker/planted.py", "import benchmarks\n", "decode_worker/planted.py:1 imports benchmarks"),
    ],
)
def test_the_check_catches_a_planted_violation(tmp_path, module, source, expected):
    assert layering_violations(_tree(tmp_path, {module: source})) == [expected]


def test_downward_imports_pass_the_check(tmp_path):
    root = _tree(
        tmp_path,
        {
            "disagg/tools/cli.py": "import disagg.server\nfrom disagg import telemetry\nimport gateway.main\n",
            "disagg/handoff/senders.py": "from disagg.rpc.channel import open_channel\n",
            "disagg/model/prefill.py": "from disagg.errors import InvalidRequest\nfrom disagg.config import X\n",
            "gateway/main.py": "from disagg.handoff import senders\nimport torch\n",
            "benchmarks/serving.py": "from disagg.tools import cli\n",
        },
    )
    assert layering_violations(root) == []
    assert package_graph(root)["disagg.tools"] == {"disagg.server", "disagg.telemetry", "gateway"}


def test_the_check_catches_a_planted_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "disagg/kv/planted.py": "from disagg.engine.decode import DecodeEngine\n",
            "disagg/engine/planted.py": "from disagg.rpc.channel import open_channel\n",
            "disagg/rpc/planted.py": "def f():\n    import disagg.kv.codec\n",
            "disagg/model/planted.py": "import disagg.config\n",
        },
    )
    assert cycles(package_graph(root)) == [["disagg.engine", "disagg.kv", "disagg.rpc"]]
    assert "disagg/kv/planted.py:1 imports disagg.engine.decode" in layering_violations(root)
