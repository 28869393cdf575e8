# syntax=docker/dockerfile:1
# A slim image that runs the whole service, `newsletter serve` (scheduler, a worker and the
# web app with /healthz and /metrics), as a non-root user.
#   docker build -t newsletter .
#   docker run -p 8000:8000 -v newsletter-data:/data -e NEWSLETTER_SMTP_HOST=… newsletter
# With no NEWSLETTER_DATABASE_URL it keeps a SQLite file in /data: one container does it all.
# The same image runs the separate roles (`newsletter worker`, `newsletter scheduler`,
# `newsletter web`) against PostgreSQL: see compose.yaml.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY newsletter ./newsletter
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
# Templates live at the top of the repository, outside the package: the image keeps them in
# /app/templates and points the service there. The web app listens on every interface
# inside the container; publish the port (or put a proxy) to choose who reaches it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEWSLETTER_DATABASE_URL=sqlite:////data/newsletter.db \
    NEWSLETTER_TEMPLATES_DIR=/app/templates \
    NEWSLETTER_WEB_HOST=0.0.0.0 \
    NEWSLETTER_WEB_PORT=8000
# A fixed numeric id: orchestrators that insist on non-root (runAsNonRoot) can check it, and
# volumes made by one version of the image stay writable by the next.
RUN groupadd --system --gid 10001 newsletter \
    && useradd --system --uid 10001 --gid newsletter --home-dir /app \
        --shell /usr/sbin/nologin newsletter \
    && mkdir -p /data /app \
    && chown newsletter:newsletter /data
COPY --from=build /install /usr/local
COPY templates /app/templates
COPY subscribers /app/subscribers
WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# SIGTERM starts a graceful stop bounded by NEWSLETTER_SHUTDOWN_GRACE_SECONDS (30 s): give
# the container longer than that (docker stop -t 40, compose stop_grace_period: 40s).
STOPSIGNAL SIGTERM
# No curl in slim images: Python asks /healthz (database and SMTP reachable), and any
# answer but 200 (or none within the timeout) counts as unhealthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NEWSLETTER_WEB_PORT', '8000'), timeout=8)"]
# init is safe to repeat (creates or upgrades the schema, makes the secret key once); exec
# makes the service PID 1, so it gets the stop signal itself.
CMD ["sh", "-c", "newsletter init && exec newsletter serve"]
