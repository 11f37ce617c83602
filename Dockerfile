# branchserve serving image: the server (FastAPI + onnxruntime, no torch) and the shipped model repository.
#   docker build -t branchserve . && docker run -p 8000:8000 branchserve
# Settings are BRANCHSERVE_* environment variables (branchserve/server/settings.py), e.g. -e BRANCHSERVE_MAX_IN_FLIGHT=32.

# Build stage: install the server with the gRPC extra (no train/loadtest extras) into a venv, without pip's
# cache. The gRPC extra (grpcio) adds 18 MB of 433 (docs/deployment.md). `--build-arg EXTRAS=grpc,ray`
# makes an image that also runs as a Ray worker (docs/deployment.md, "Ray cluster").
FROM python:3.11-slim AS build
ARG EXTRAS=grpc
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY branchserve branchserve
RUN /opt/venv/bin/pip install ".[${EXTRAS}]" && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Runtime stage: the venv and the models only; sources and build files stay behind.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BRANCHSERVE_HOST=0.0.0.0 \
    BRANCHSERVE_PORT=8000 \
    BRANCHSERVE_GRPC_PORT=8001 \
    BRANCHSERVE_REPOSITORY=/srv/models
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --no-create-home --home-dir /srv --shell /usr/sbin/nologin branchserve
WORKDIR /srv
COPY models /srv/models
# By uid, so an orchestrator can tell it is not root (Kubernetes' runAsNonRoot).
USER 10001
EXPOSE 8000 8001
# Readiness, in Python: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['BRANCHSERVE_PORT']}/v2/health/ready\", timeout=2)"]
# Exec form: branchserve is PID 1 and gets SIGTERM itself; uvicorn then drains in-flight requests and exits.
STOPSIGNAL SIGTERM
CMD ["branchserve", "serve"]
