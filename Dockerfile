# syntax=docker/dockerfile:1
# The Replika broker. Build: docker build -t replika:0.1.0 .
# Run (tokens from an auth file; see SECURITY.md):
#   docker run -d --name replika -p 8777:8777 -p 127.0.0.1:8333:8333 -v replika-data:/data \
#     -v "$PWD/deploy/auth.toml:/run/secrets/replika_auth:ro" -e REPLIKA_AUTH=/run/secrets/replika_auth replika:0.1.0
# The container listens on 0.0.0.0, so the broker refuses to start without --auth (REPLIKA_AUTH) or, on a
# network that is itself trusted, --insecure (REPLIKA_INSECURE=1).

# --- build: the package and its dependencies into a virtualenv; compilers and caches stay behind -----------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY clients/python/ clients/python/
COPY replika_server/ replika_server/
# With the postgresql extra (psycopg and its bundled libpq), so that one image serves both engines: the embedded
# LMDB store by default, or --store postgresql://... (deploy/docker/compose.postgres.yml, deploy/k8s/postgres/).
RUN python -m venv /opt/replika && /opt/replika/bin/pip install ".[postgresql]" && /opt/replika/bin/replika --version

# --- runtime -----------------------------------------------------------------------------------------------------
FROM python:3.11-slim
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 replika \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin replika \
 && mkdir -p /data /etc/replika \
 && chown 10001:10001 /data && chmod 0700 /data
COPY --from=build /opt/replika /opt/replika
# The container's defaults live in a config file rather than in REPLIKA_* variables, so that the environment
# (and flags) can still override each of them: precedence is flag > environment > config file > default.
COPY deploy/docker/replika.toml /etc/replika/replika.toml
ENV PATH=/opt/replika/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REPLIKA_CONFIG=/etc/replika/replika.toml
# The store. A named volume or a PersistentVolumeClaim: the container's own layer would lose it.
VOLUME ["/data"]
# 8777: the broker protocol; 8333: the admin sidecar (dashboard, admin API, /metrics, /healthz, /readyz).
EXPOSE 8777 8333
USER 10001:10001
# Slim images have no curl: ask the admin sidecar with the Python that is there. /healthz needs no token.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REPLIKA_ADMIN_PORT', '8333'), timeout=3)"]
# replika serve drains on SIGTERM and exits 0; give it the stop timeout it needs (docker stop -t, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["replika"]
CMD ["serve"]
