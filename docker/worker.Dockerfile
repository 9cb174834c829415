# A GPU worker. PyPI's Linux torch wheel bundles the CUDA runtime; the host supplies the
# driver through the NVIDIA container toolkit. One worker process per GPU.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LETHE_HOME=/data HF_HUB_OFFLINE=1
WORKDIR /srv/lethe
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker]"
CMD ["lethe", "worker", "--queues", "images,train"]
