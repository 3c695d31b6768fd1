# syntax=docker/dockerfile:1
# The toolkit on a pinned CUDA PyTorch image. Build: docker build -t starcoder-lora:0.1.0 .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /app
# The BuildKit cache mount keeps pip's cache out of the image and reuses it across builds (hadolint accepts it
# in place of --no-cache-dir, so no rule is ignored).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    pip install -r /tmp/requirements.txt

COPY . /app

# A numeric non-root user, so Kubernetes' runAsNonRoot can verify it; HF_HOME points at the mounted volume.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/app app \
    && mkdir -p /data \
    && chown 10001:10001 /data
ENV HF_HOME=/data/hf-cache \
    STARCODER_LORA_CACHE=/home/app/.cache/starcoder-lora \
    PYTHONUNBUFFERED=1
USER 10001

# The demo: the embedded tiny StarCoder, offline, W&B offline unless WANDB_API_KEY is set.
CMD ["python", "base_with_tflops.py", "--model", "tiny-starcoder", "--dataset", "stdlib-code", "--output_dir", "/data/outputs/demo"]
