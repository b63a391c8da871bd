# One image for the API, the worker and beat. The worker needs a CUDA build of torch: PyPI's
# Linux wheel of torch carries CUDA, so the default TORCH_INDEX_URL is PyPI's. For a CPU-only
# image (API, beat, laptops) build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INSTABATCH_VAR_DIR=/var/lib/instabatch

RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 instabatch \
    && mkdir -p /var/lib/instabatch && chown instabatch /var/lib/instabatch

WORKDIR /app
# torch first, pinned, from the chosen index: nothing else may pull another build.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
# The source tree as is, installed in place: migrations/ and instaflow/weights/ are found next
# to the code (core.settings.REPO_ROOT), exactly as in a development checkout.
COPY . /app
RUN pip install -e . && pip install --no-deps invisible-watermark==0.2.0

USER instabatch
EXPOSE 8000
CMD ["instabatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
