# syntax=docker/dockerfile:1
# A slim image that runs the newsletter service as a non-root user.
#   docker build -t newsletter .
#   docker run -e NEWSLETTER_DATABASE_URL=postgresql+psycopg://… -e NEWSLETTER_SMTP_HOST=… newsletter
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY newsletter ./newsletter
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEWSLETTER_DATABASE_URL=sqlite:////data/newsletter.db \
    NEWSLETTER_TEMPLATES_DIR=/app/templates
RUN groupadd --system newsletter \
    && useradd --system --gid newsletter --home-dir /app --shell /usr/sbin/nologin newsletter \
    && mkdir -p /data /app \
    && chown newsletter:newsletter /data
COPY --from=build /install /usr/local
COPY templates /app/templates
COPY subscribers /app/subscribers
WORKDIR /app
USER newsletter
VOLUME ["/data"]
EXPOSE 8000
CMD ["sh", "-c", "newsletter init && exec newsletter send"]
