# clinicadl-app: the BIDS App image.  docker run IMAGE BIDS_DIR OUTPUT_DIR {participant,group} [options]
#
# Build (VERSION is the content of the `version` file, the single source of the version):
#   CPU:  docker build --build-arg VERSION="$(cat version)" -t clinicadl-app:"$(cat version)" .
#   CUDA: docker build --build-arg VERSION="$(cat version)" --build-arg TORCH_INDEX_URL= \
#                      -t clinicadl-app:"$(cat version)"-cuda .      (PyPI's torch 2.13.0 is the CUDA build)
# BASE_IMAGE is pinned by digest; circle-ci/test_container_local.sh points it at a local debootstrap image.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
FROM ${BASE_IMAGE}

ARG VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

LABEL org.opencontainers.image.title="clinicadl-app" \
      org.opencontainers.image.description="BIDS App: reproducible, leakage-free deep learning on brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/clinicadl-app/clinicadl-app" \
      org.opencontainers.image.licenses="MIT"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's Python 3.11 (the torch wheels' ABI), no recommends; the allocator comes from a wheel
# (cmeel-mimalloc, preloaded by clinicadl-app itself: see clinicadl_app/core/allocator.py), which needs libatomic
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3=3.11.* python3-venv=3.11.* libatomic1=12.* ca-certificates=2023* \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock /opt/clinicadl-app/requirements.lock
RUN python3 -m venv /opt/venv \
 && PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" pip install "torch==${TORCH_VERSION}" \
 && pip install -r /opt/clinicadl-app/requirements.lock

COPY pyproject.toml version README.md run.py /opt/clinicadl-app/
COPY clinicadl_app /opt/clinicadl-app/clinicadl_app
RUN pip install --no-deps /opt/clinicadl-app \
 && test "$(clinicadl-app --version)" = "clinicadl-app ${VERSION}" \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin clinicadl

# Read-only root file system: everything written goes to OUTPUT_DIR (or -w WORK_DIR); see cli.scratch()
ENV CLINICADL_APP_IMAGE="clinicadl-app:${VERSION}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/clinicadl
ENTRYPOINT ["clinicadl-app"]
CMD ["--help"]
