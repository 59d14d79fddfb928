"""requirements.lock (scripts/lock.sh) pins every dependency pyproject.toml names, within its range, with hashes:
a dependency added or narrowed without regenerating the lock fails here, before an install misses it."""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for every pin in the lock."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), 0)
        elif "--hash=sha256:" in line and current:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["bench"]]]


def test_lock_pins_every_declared_dependency_within_its_range() -> None:
    pins = _locked()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # installed first, pinned, outside the lock (scripts/install.sh)
            assert str(req.specifier) == "==2.13.0", "torch must stay pinned exactly (a range pulls a CUDA build)"
            continue
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req.name}: locked {pins[name][0]} is outside {req.specifier}")
    assert not problems, "requirements.lock is stale; run scripts/lock.sh:\n" + "\n".join(problems)


def test_every_pin_has_a_hash_and_torch_is_not_locked() -> None:
    pins = _locked()
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)
    assert all(hashes > 0 for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
