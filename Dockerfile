# GPU image: CUDA runtime base; PyPI's torch 2.13.0 wheel for Linux x86_64 is the CUDA build.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv espeak-ng libsndfile1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-models.txt ./
RUN python3.11 -m venv /venv && /venv/bin/pip install --no-cache-dir --upgrade pip \
    && /venv/bin/pip install --no-cache-dir -r requirements.txt \
    && /venv/bin/pip install --no-cache-dir --no-deps -r requirements-models.txt
COPY . .

# Mount a checkpoint at /models/voxtral and set VOXTRAL_MODEL=/models/voxtral to skip the download.
ENV VOXTRAL_MODEL=mistralai/Voxtral-Mini-3B-2507 HF_HOME=/cache/huggingface
EXPOSE 7860
CMD ["/venv/bin/python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
