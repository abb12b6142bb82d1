# GPU image: CUDA runtime base; PyPI's torch 2.13.0 wheel for Linux x86_64 is the CUDA build.
#   docker build -t voxtral-realtime .
#   docker run --gpus all --network host -v voxtral-hf:/cache/huggingface voxtral-realtime   (README: Docker)
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

# The app runs unprivileged; the model cache is the only place it writes, kept on a volume so a new
# container does not download the ~9 GB model again. Mount a checkpoint at /models/voxtral and
# pass --model /models/voxtral (or -e VOXTRAL_MODEL=/models/voxtral) to skip the download.
RUN useradd --create-home --uid 1000 voxtral && mkdir -p /cache/huggingface && chown voxtral /cache/huggingface
ENV HF_HOME=/cache/huggingface HOST=0.0.0.0 PORT=7860
VOLUME /cache/huggingface
EXPOSE 7860

# /health answers once the model is loaded (the first start downloads it: up to half an hour).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD /venv/bin/python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '7860'), timeout=8)"

USER voxtral
# Same entry point as `python app.py`: flags after the image name go to app.py (docker run ... IMAGE --max-sessions 4).
ENTRYPOINT ["/venv/bin/python", "app.py"]
CMD []
