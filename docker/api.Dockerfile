# The API: FastAPI + RQ client only. No torch, so the image is small and starts in a second.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LETHE_HOME=/data
WORKDIR /srv/lethe
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install --no-cache-dir .
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["lethe", "serve", "--no-workers", "--host", "0.0.0.0", "--port", "8000"]
