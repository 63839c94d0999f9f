# Loupe server image. torch is pinned to the CPU build; for a GPU build, install torch for your CUDA first.
FROM python:3.11-slim-bookworm

# g++: the compiled image lanes on CPUs where the bf16 image copy serves (server/loupe/models/compiled_image.py;
# without it the trace serves).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-eng g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY migrations ./migrations
COPY frontend ./frontend
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .

ENV LOUPE_DATA_DIR=/data \
    LOUPE_SERVER__HOST=0.0.0.0 \
    LOUPE_SERVER__PORT=8000
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4)"
CMD ["loupe", "serve"]
