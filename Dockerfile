# syntax=docker/dockerfile:1
# Build stage: resolve pinned, hash-checked dependencies into a venv.
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.lock ./
RUN python -m venv /opt/kms && /opt/kms/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY kms_service ./kms_service
COPY providers ./providers
COPY migrations ./migrations
RUN /opt/kms/bin/pip install --no-deps .

# Final stage: no compilers, no pip cache, non-root.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/kms --create-home kms
COPY --from=build /opt/kms /opt/kms
ENV PATH=/opt/kms/bin:$PATH KMS_DATA_DIR=/var/lib/kms KMS_LISTEN=0.0.0.0:8400 PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8400
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8400/v1/sys/health', timeout=2).status != 200)"]
ENTRYPOINT ["kms"]
CMD ["serve"]
