# syntax=docker/dockerfile:1
#
# kms-service image: `kms` on a slim CPython 3.11, run as uid/gid 10001, read-only-root friendly.
#
# Base image: pinned by tag to a fixed Debian release (bookworm), because the bare `3.11-slim` tag
# moves between Debian releases. It is NOT pinned by digest: this repository is prepared offline
# and a digest cannot be looked up here. Release builds should pass the digest, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
# (`docker buildx imagetools inspect python:3.11-slim-bookworm` prints it). Both stages use the
# same base so the venv's interpreter path (/usr/local/bin/python3.11) exists in the final stage.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: resolve the hash-pinned runtime dependencies (requirements.lock) into a venv.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.lock ./
RUN python -m venv /opt/kms \
    && /opt/kms/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY kms_service ./kms_service
COPY providers ./providers
COPY migrations ./migrations
# --no-deps: every dependency came from the hash-checked lock above. pip compiles .pyc files at
# install time, so nothing needs to be written at run time (the root filesystem is read-only).
# The installer itself is removed from the venv: the final image cannot install anything.
RUN /opt/kms/bin/pip install --no-deps . \
    && /opt/kms/bin/pip uninstall --yes pip setuptools

# Final stage: the venv and nothing else from the build; no compilers, no pip, no cache.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kms-service" \
      org.opencontainers.image.description="Key management service for envelope encryption" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip/setuptools/wheel are installers too: remove them. The service user
# has no login shell; its home is the (empty, 0700) data directory /var/lib/kms, which compose
# and Kubernetes mount a volume over. --no-log-init keeps lastlog/faillog small for a high uid.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 10001 kms \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/kms \
        --no-create-home --shell /usr/sbin/nologin kms \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/kms
# Code stays root-owned and read-only for uid 10001 (no --chown on purpose).
COPY --from=build /opt/kms /opt/kms
# PYTHONUNBUFFERED: logs reach `docker logs`/`kubectl logs` at once. PYTHONDONTWRITEBYTECODE:
# never try to write .pyc next to the code (read-only root; they were compiled at build time).
# The only writable places the service uses are KMS_DATA_DIR and /tmp (both volumes in k8s).
ENV PATH=/opt/kms/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    KMS_DATA_DIR=/var/lib/kms \
    KMS_LISTEN=0.0.0.0:8400
USER 10001:10001
EXPOSE 8400
# Docker/compose health: /v1/sys/health answers 200 when the database answers (503 otherwise).
# It follows KMS_LISTEN's port, and speaks HTTPS once KMS_TLS_CERT_FILE is set (the certificate
# is issued for the service name, not 127.0.0.1, so this loopback probe does not verify it; it
# is a liveness signal, not a trust decision). Kubernetes ignores HEALTHCHECK: see deploy/.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,ssl,sys,urllib.request as u; tls=bool(os.environ.get('KMS_TLS_CERT_FILE')); port=os.environ.get('KMS_LISTEN','0.0.0.0:8400').rpartition(':')[2]; ctx=ssl._create_unverified_context() if tls else None; r=u.urlopen(('https' if tls else 'http')+'://127.0.0.1:'+port+'/v1/sys/health', timeout=2, context=ctx); sys.exit(r.status != 200)"]
ENTRYPOINT ["kms"]
CMD ["serve"]
