# syntax=docker/dockerfile:1
# snapserve images, all from this file (docs/deploy.md):
#   server      (the default: last stage) gRPC server on CPU: onnxruntime, no PyTorch
#   server-gpu  the same server with onnxruntime-gpu and its CUDA and cuDNN libraries from pip
#   trainer     the trainer with CPU PyTorch; writes model versions into /models
#
#   docker build -t snapserve .
#   docker build --target server-gpu -t snapserve:gpu .
#   docker build --target trainer -t snapserve:trainer .
#
# BASE_IMAGE: a Debian 12 (bookworm) image with python3 (3.11+) and its venv module, like the
# default: the C++ front end's packages below are bookworm's, pinned.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- settings for all
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------------------- builder: the wheel
# Only the project's own wheel is built here; the images install it with pinned dependencies
# (constraints.txt), so no source tree, build tool or cache reaches them.
FROM base AS builder
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY trainer/ trainer/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && cp constraints.txt /wheels/

# ---------------------------------------------------------------------------- cpp: C++ front end
# `--cpp-grpc-port` (docs/reliability.md) serves unary gRPC through a library built against the
# system's gRPC C++ library. It is compiled here, so the server images carry gRPC's shared
# libraries and the built file, and no compiler.
FROM base AS cpp
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 libgrpc++-dev=1.51.1-3+b1 \
       pkg-config=1.8.1-1 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/cpp \
    && whl=$(find /wheels -name 'snapserve_ensembles-*.whl') \
    && /opt/cpp/bin/pip install --no-cache-dir --no-deps "${whl}" \
    && SNAPSERVE_CPP_DIR=/opt/snapserve/cpp /opt/cpp/bin/python -m snapserve.server.cpp.binding

# ---------------------------------------------------------------------------- common runtime
FROM base AS runtime
# The model repository (<model>/<version>/, docs/model-repository.md): mount it here.
# ORT_DISABLE_TELEMETRY: onnxruntime (1.31+) otherwise starts its telemetry at import and warns
# that it cannot persist a device id (a read-only, home-less user).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1 \
    SNAPSERVE_MODEL_REPOSITORY=/models \
    SNAPSERVE_HOST=0.0.0.0 \
    SNAPSERVE_PORT=50051 \
    SNAPSERVE_HTTP_PORT=8000 \
    SNAPSERVE_METRICS_PORT=8002 \
    SNAPSERVE_METRICS_HOST=0.0.0.0 \
    SNAPSERVE_PLAN_CACHE=/var/cache/snapserve/plans
# A fixed non-root uid/gid (10001), so Kubernetes' runAsUser/fsGroup can name it. The plan cache
# lives in the container unless a volume is mounted on /var/cache/snapserve (the user has no
# home); where it cannot be written, the server measures at every start and says so.
RUN groupadd --system --gid 10001 snapserve \
    && useradd --system --no-log-init --uid 10001 --gid snapserve \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin snapserve \
    && mkdir /models /var/cache/snapserve \
    && chown snapserve:snapserve /models /var/cache/snapserve

# ---------------------------------------------------------------------------- serving runtime
# What both server images add: gRPC's C++ runtime libraries and the C++ front end built above
# (found by its source's hash in SNAPSERVE_CPP_DIR, so the server never compiles it).
FROM runtime AS serving
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgrpc++1.51=1.51.1-3+b1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpp /opt/snapserve/cpp /opt/snapserve/cpp
ENV SNAPSERVE_CPP_DIR=/opt/snapserve/cpp

# ---------------------------------------------------------------------------- server-gpu
FROM serving AS server-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# onnxruntime-gpu's [cuda,cudnn] extras bring the CUDA runtime, cuBLAS, cuFFT, cuRAND and cuDNN as
# pip wheels; ld.so learns their folders, so no CUDA base image is needed. The host provides the
# driver (NVIDIA container toolkit / device plugin).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && whl=$(find /wheels -name 'snapserve_ensembles-*.whl') \
    && pip install --no-cache-dir -c /wheels/constraints.txt "${whl}[gpu]" "onnxruntime-gpu[cuda,cudnn]" \
    && find /opt/venv -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' \
       | sort -u > /etc/ld.so.conf.d/snapserve-nvidia.conf \
    && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SNAPSERVE_DEVICE=cuda
USER 10001:10001
VOLUME ["/models"]
EXPOSE 50051 8000 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "snapserve.server.process.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ensemble-server"]

# ---------------------------------------------------------------------------- trainer
FROM runtime AS trainer
# PyPI's Linux torch wheel is the CUDA build (GBs); the CPU build comes from PyTorch's own index.
# The pin (constraints.txt) still holds: 2.13.0+cpu satisfies torch==2.13.0.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && whl=$(find /wheels -name 'snapserve_ensembles-*.whl') \
    && pip install --no-cache-dir -c /wheels/constraints.txt --extra-index-url "${TORCH_INDEX_URL}" \
       "${whl}[cpu,train]"
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
VOLUME ["/models"]
ENTRYPOINT ["trainer"]
CMD ["--help"]

# ---------------------------------------------------------------------------- server (default)
FROM serving AS server
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && whl=$(find /wheels -name 'snapserve_ensembles-*.whl') \
    && pip install --no-cache-dir -c /wheels/constraints.txt "${whl}[cpu]"
USER 10001:10001
VOLUME ["/models"]
EXPOSE 50051 8000 8002
# gRPC health (grpc.health.v1) on 127.0.0.1:$SNAPSERVE_PORT: SERVING once the models are loaded
# (the same answer as GET /v2/health/ready on the REST port; the image has no curl to ask that).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "snapserve.server.process.healthcheck"]
STOPSIGNAL SIGTERM
# Configure with flags after the image name or SNAPSERVE_* variables (ensemble-server --help).
ENTRYPOINT ["ensemble-server"]
