# The resdeploy inference server (`resdeploy serve`) as an image, serving the model repository mounted at /models.
#
#   docker build -t resdeploy:gpu .                               # CUDA 12.6 + cuDNN 9; TensorRT, onnxruntime-gpu
#   docker build --build-arg VARIANT=cpu -t resdeploy:cpu .       # CPU only (ONNX Runtime on the CPU), no CUDA
#   docker run --gpus all -p 8000:8000 -v "$PWD/model_repository:/models:ro" resdeploy:gpu
#
# Two stages: `build` makes a venv in /opt/resdeploy (pip, headers and compilers stay there); the runtime image
# gets the venv, the Python interpreter and nothing else. Every version is pinned here: base images by tag, Python
# packages by the build arguments below (change them together: TensorRT and onnxruntime-gpu need the CUDA major
# of the base image). The server runs as an unprivileged user; the repository is read-only to it.
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

# ---------------------------------------------------------------------------------------------------------------
# DL3006 (untagged image): base-gpu / base-cpu are this file's own stages; their images are pinned by tag above.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
# The server never runs PyTorch, but resdeploy depends on it: the CPU wheel keeps the image gigabytes smaller.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TENSORRT_VERSION=10.13.3.9
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
ARG CUDA_PYTHON_VERSION=12.9.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# DL3008 (apt versions unpinned): the pinned base image's release (Ubuntu 24.04) fixes them; pinning each package's
# exact version would break the build at every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/resdeploy
ENV PATH=/opt/resdeploy/bin:$PATH
# DL3013 (pip without ==): the pin is in TORCH_SPEC (torch==...), which hadolint cannot see through.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY resdeploy ./resdeploy
# gpu: the gpu extra at pinned versions; onnxruntime-gpu provides the same `onnxruntime` module as the CPU wheel
# that resdeploy depends on, so the CPU wheel is removed and onnxruntime-gpu reinstalled over it.
# DL3013 (pip without ==): "." is this source tree; the packages named beside it are pinned by the build arguments.
# hadolint ignore=DL3013
RUN if [ "${VARIANT}" = "gpu" ]; then \
      pip install ".[gpu]" "tensorrt==${TENSORRT_VERSION}" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
                  "cuda-python==${CUDA_PYTHON_VERSION}" \
   && pip uninstall -y onnxruntime \
   && pip install --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
    else \
      pip install .; \
    fi \
 && resdeploy --version

# ---------------------------------------------------------------------------------------------------------------
# DL3006: as for the build stage (a stage alias, not an image).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/resdeploy/bin:$PATH
# DL3008: as in the build stage (the base image's release pins the interpreter the venv was made with).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin resdeploy
COPY --from=build /opt/resdeploy /opt/resdeploy
USER 10001
WORKDIR /tmp
# 8000: HTTP (KServe v2 / Triton protocol); 8001: gRPC, as on Triton.
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["resdeploy", "serve", "/models"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
