"""Generate the Python gRPC stubs under disagg/pb from protos/ (run: python scripts/gen_protos.py).

The output is committed; tests/test_protos.py regenerates it into a temporary folder and fails when it is stale.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "disagg" / "pb"


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc writes absolute imports (`from disagg.v1 import ...`); make them point inside disagg.pb.
    for path in out.rglob("*.py"):
        text = re.sub(r"^from disagg\.v1 import", "from disagg.pb.disagg.v1 import", path.read_text(), flags=re.M)
        path.write_text(text)
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)
