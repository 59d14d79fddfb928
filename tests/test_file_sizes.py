"""No hand-written Python file over 450 lines: past that a file holds more than one concern, and is split by concern
(a test file by what its tests test). The generated protobuf modules (disagg/pb) are not hand-written."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 450
FOLDERS = ("disagg", "gateway", "prefill_worker", "decode_worker", "benchmarks", "tests", "scripts", "deploy")
GENERATED = ("disagg/pb",)


def long_files(root: pathlib.Path) -> list[str]:
    """`path: N lines` for each hand-written Python file under `root` longer than MAX_LINES."""
    paths = sorted(root.glob("*.py"))
    for folder in FOLDERS:
        paths += sorted((root / folder).rglob("*.py"))
    found = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if any(relative.startswith(f"{generated}/") for generated in GENERATED):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{relative}: {lines} lines")
    return found


def test_no_hand_written_python_file_is_over_450_lines():
    assert long_files(ROOT) == []


def test_the_check_catches_a_long_file(tmp_path):
    for module, lines in {
        "gateway/long.py": MAX_LINES + 1,
        "tests/at_the_limit.py": MAX_LINES,
        "disagg/pb/disagg/v1/worker_pb2.py": 3 * MAX_LINES,  # generated
        "setup.py": MAX_LINES + 2,
        "docs/notes.md": 2 * MAX_LINES,  # not Python
    }.items():
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("x = 1\n" * lines)
    assert long_files(tmp_path) == ["setup.py: 452 lines", "gateway/long.py: 451 lines"]
