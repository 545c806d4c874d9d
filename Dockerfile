# syntax=docker/dockerfile:1
#
# Two images from one file (build from the repository root):
#
#   docker build --target predictor -t ghcr.io/qwen-image-serve/predictor:0.1.0 .
#   docker build --target adapter   -t ghcr.io/qwen-image-serve/adapter:0.1.0 .
#
# predictor: the project with its `predictor` extra (torch, diffusers, transformers,
#            accelerate). One image serves both InferenceServices; the Helm chart picks the
#            console script (qwen-image-predictor or qwen-image-edit-predictor).
# adapter:   the project without extras (no torch): the OpenAI Images API adapter.
#
# Why a slim Python base and not nvidia/cuda for the GPU image: torch's Linux wheels bundle
# the CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ...) as pip packages, and the NVIDIA
# container toolkit mounts the driver (libcuda) from the node when the pod gets a GPU. A
# nvidia/cuda base would only add a second copy of those libraries.
#
# Which CUDA: torch's Linux x86_64 wheels on PyPI (2.13 and later) are built against CUDA 13.0
# and need an NVIDIA driver >= 580 on the nodes. For older drivers install torch from a
# PyTorch index built against an older CUDA, for example
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (it must carry the torch version requirements/predictor.txt pins, as a local version such
# as 2.13.0+cu128; the other packages still come from PyPI), and for a small CPU-only image
# (smoke tests with the tiny model) use https://download.pytorch.org/whl/cpu.
#
# Reproducible dependencies: every package is installed at the version requirements/*.txt
# pins (`make lock` writes them from pyproject.toml, for Linux x86_64 and the base image's
# Python), used as pip constraints.
#
# Nothing secret goes into the image: Hugging Face tokens and the adapter's API key arrive at
# run time as environment variables from Kubernetes Secrets.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
# base: the Python runtime, a fixed non-root user (UID/GID 1000, so that Kubernetes'
# runAsNonRoot can verify it) and an empty virtual environment location on PATH.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app

# ---------------------------------------------------------------------------------------------
# requirements: the dependency lists, read from pyproject.toml. Later stages copy only these
# files, and Docker caches a COPY by content: editing pyproject.toml without touching its
# dependencies (a version bump, a ruff setting) keeps the large dependency layers cached.
# The predictor gets the `predictor` and `fp8` extras (torchao, for --quantization fp8).
FROM base AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import re, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extra = p['optional-dependencies']['predictor'] + p['optional-dependencies']['fp8']; \
torch = [r for r in extra if re.match(r'torch\b', r)]; \
rest = [r for r in extra if r not in torch]; \
open('requirements-base.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('requirements-torch.txt', 'w').write('\n'.join(torch) + '\n'); \
open('requirements-predictor.txt', 'w').write('\n'.join(p['dependencies'] + rest) + '\n')"

# ---------------------------------------------------------------------------------------------
# wheel: the project itself, built once for both images. Only this stage sees the source.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY predictors ./predictors
COPY openai_adapter ./openai_adapter
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# predictor-build: torch first (the largest and most stable layer), pinned by its own part of
# the lock (requirements/predictor-torch.txt) so that a change to another pin leaves it
# cached, then the other dependencies, then the project wheel.
FROM base AS predictor-build
ARG TORCH_INDEX_URL=""
COPY --from=requirements /src/requirements-torch.txt /src/requirements-predictor.txt /tmp/
COPY requirements/predictor-torch.txt /tmp/torch-constraints.txt
RUN python -m venv /opt/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
         pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
           -c /tmp/torch-constraints.txt -r /tmp/requirements-torch.txt; \
       else \
         pip install -c /tmp/torch-constraints.txt -r /tmp/requirements-torch.txt; \
       fi
COPY requirements/predictor.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt -r /tmp/requirements-predictor.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl

# ---------------------------------------------------------------------------------------------
# adapter-build: the base dependencies only (no torch), then the project wheel.
FROM base AS adapter-build
COPY --from=requirements /src/requirements-base.txt /tmp/
COPY requirements/adapter.txt /tmp/constraints.txt
RUN python -m venv /opt/venv \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements-base.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl

# ---------------------------------------------------------------------------------------------
# predictor: KServe ModelServer, HTTP 8080 (v2 REST, /metrics), gRPC 8081. The chart sets the
# command (qwen-image-predictor or qwen-image-edit-predictor) and --model_name; the CMD below
# is the text-to-image predictor for `docker run`.
FROM base AS predictor
# A C and C++ toolchain at run time: the first time a compiled block runs on a GPU, Triton
# builds its CUDA driver module and kernel launchers with a C compiler (against Python's
# headers, which the python image has), and TorchInductor's CPU kernels are C++. Without
# one, --compile auto (the default) leaves the blocks uncompiled. The packages are those of
# the base image's Debian release, hence unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# The driver libraries the NVIDIA container toolkit mounts; the GPU device plugin sets
# NVIDIA_VISIBLE_DEVICES per container, so the image does not.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/app
COPY --from=predictor-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /home/app
EXPOSE 8080 8081
CMD ["qwen-image-predictor", "--http_port", "8080", "--grpc_port", "8081"]

# ---------------------------------------------------------------------------------------------
# adapter: the OpenAI Images API on port 8000 (CPU only). Last stage, so also the default
# target of a plain `docker build`.
FROM base AS adapter
ENV HOME=/home/app
COPY --from=adapter-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /home/app
EXPOSE 8000
CMD ["qwen-image-adapter", "--host", "0.0.0.0", "--port", "8000"]
