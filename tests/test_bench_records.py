"""The committed benchmark records and their index: every record listed in benchmarks/results/README.md, every
suite's command shown there verbatim, and every command still accepted by today's parsers (a renamed or removed
flag would make a record impossible to remake)."""

from __future__ import annotations

import fnmatch
import importlib
import pathlib
import re
import shlex

import pytest

from benchmarks.suites import RESULTS, SUITES, Recipe, main, recipes
from disagg.tools.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
INDEX = ROOT / RESULTS / "README.md"


def _indexed_names() -> set[str]:
    """The record names the index mentions in backticks (`peer_vllm_*` stands for a family of records)."""
    return set(re.findall(r"`([A-Za-z0-9_]+\*?)`", INDEX.read_text()))


def test_every_record_is_in_the_index():
    names = _indexed_names()
    stems = {path.name.split(".")[0] for path in (ROOT / RESULTS).iterdir() if path.name != "README.md"}
    missing = sorted(s for s in stems if not any(fnmatch.fnmatchcase(s, name) for name in names))
    assert missing == [], f"add these records to {INDEX.relative_to(ROOT)}: {missing}"


@pytest.mark.parametrize("recipe", recipes(), ids=lambda recipe: recipe.record)
def test_every_recipe_has_its_record_and_its_command_in_the_index(recipe: Recipe):
    assert (ROOT / RESULTS / f"{recipe.record}.json").is_file()
    assert any(f"{RESULTS}/{recipe.record}" in arg for arg in recipe.argv)  # the command writes that record
    assert recipe.command in INDEX.read_text().splitlines()  # shown verbatim, one line
    assert f"`{recipe.record}`" in INDEX.read_text()


@pytest.mark.parametrize("recipe", recipes(), ids=lambda recipe: recipe.record)
def test_every_recipe_command_still_parses(recipe: Recipe):
    command = list(recipe.argv)
    if command[0] == "disagg":
        args = build_parser().parse_args(command[1:])
        assert args.func.__module__ == "benchmarks.cli"
    else:
        assert command[:2] == ["python", "-m"]
        module = importlib.import_module(command[2])
        args = module.build_parser().parse_args(command[3:])
    assert any(f"{RESULTS}/{recipe.record}" in str(value) for value in vars(args).values())


def test_suites_run_elsewhere_with_extra_flags(capsys, tmp_path):
    recipe = SUITES["goodput"][0]
    moved = recipe.argv_for("/tmp/smoke/", ["--num-requests", "5"])
    assert moved[-4:] == ["--output", "/tmp/smoke/goodput_aggregated_vs_disaggregated", "--num-requests", "5"]
    assert build_parser().parse_args(moved[1:]).num_requests == 5  # the later flag wins
    main(["threads", "--dry-run", "--out-dir", str(tmp_path / "records"), "--", "--repeats", "1"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(SUITES["threads"])
    assert shlex.split(printed[0])[0] == "GOMP_SPINCOUNT=" and printed[0].endswith("--repeats 1")
    assert f"--output {tmp_path}/records/threads_c32_old_up " in printed[0]
    assert not (tmp_path / "records").exists()  # a dry run writes nothing
    with pytest.raises(SystemExit, match="known: cluster_vs_generate"):
        main(["no_such_suite"])
