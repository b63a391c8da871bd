# Two images from one Dockerfile, chosen with the TORCH_FLAVOUR build argument (docker-compose.yml
# builds both):
#   cpu   torch's CPU build (download.pytorch.org/whl/cpu): the API, beat, migrations, laptops
#         docker build --build-arg TORCH_FLAVOUR=cpu -t instabatch:cpu .
#   cuda  PyPI's Linux wheel of torch, which carries the CUDA runtime: the GPU workers (the host
#         needs only the NVIDIA driver and the NVIDIA Container Toolkit)
#         docker build --build-arg TORCH_FLAVOUR=cuda -t instabatch:cuda .
ARG TORCH_FLAVOUR=cuda
ARG TORCH_VERSION=2.13.0

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INSTABATCH_VAR_DIR=/var/lib/instabatch
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 instabatch \
    && mkdir -p /var/lib/instabatch && chown instabatch /var/lib/instabatch
WORKDIR /app

# torch first, pinned, from the flavour's index: nothing else may pull another build.
FROM base AS torch-cpu
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

FROM base AS torch-cuda
ARG TORCH_VERSION
RUN pip install --index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

FROM torch-${TORCH_FLAVOUR} AS app
# The source tree as is, installed in place: migrations/ and instaflow/weights/ are found next
# to the code (core.settings.REPO_ROOT), exactly as in a development checkout.
COPY . /app
RUN pip install -e . && pip install --no-deps invisible-watermark==0.2.0

USER instabatch
EXPOSE 8000
CMD ["instabatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
