# The broker's one image: web (the default CMD), worker, cron and migrate differ only by command
# (see the Procfile and docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BROKER_ENV=production \
    PORT=8000

RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --no-create-home --home-dir /app --shell /usr/sbin/nologin broker

WORKDIR /app

# Runtime dependencies only (requirements-dev.txt stays out of the image).
COPY requirements.txt .
RUN pip install -r requirements.txt

# The code stays root-owned and read-only to the app; only instance/ (local media) is writable.
COPY . .
RUN mkdir -p /app/instance/media && chown -R broker:broker /app/instance

USER 10001:10001

EXPOSE 8000

# python, not curl: slim has no curl. Fails on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
