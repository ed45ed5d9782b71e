# cbam-viz: the Gradio app (app.py), the cbam_viz library and the shipped weights, CPU inference.
# Build and smoke-test locally: ../shared/tools/container-smoke.sh .   (see .ci/run for the flags)
FROM python:3.11-slim

# Build-time only. Empty by default, so a plain `docker build` (or a Hugging Face Docker Space)
# installs from PyPI. CI points them at the local wheel mirrors it mounts read-only with
# `podman build -v /opt/pypi-more:/opt/pypi-more:ro ...`, so the ~4 GB of torch + CUDA wheels are
# read from disk instead of downloaded. ARGs are not kept in the final image's environment.
# Several URLs may be separated by commas: container-smoke.sh word-splits BUILD_ARGS, so a space
# cannot get through. (pip prefers a file:// *index* over PyPI for the same file; it does not
# prefer a find-links folder, so list local mirrors in PIP_EXTRA_INDEX_URL.)
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    MPLCONFIGDIR=/tmp/matplotlib

# Hugging Face Docker Spaces run the container as uid 1000; use the same user everywhere.
RUN useradd --create-home --uid 1000 app
WORKDIR /home/app/cbam-viz

# Dependencies first, so editing the code does not reinstall torch.
COPY requirements.txt .
# (No SHELL/bash here: podman's default OCI image format ignores SHELL. `echo` cannot fail, so the
# pipe needs no pipefail.)
# hadolint ignore=DL4006
RUN PIP_EXTRA_INDEX_URL="$(echo "$PIP_EXTRA_INDEX_URL" | tr , ' ')" pip install --no-cache-dir -r requirements.txt

# .dockerignore is an allow-list: app.py, cbam_viz/, weights/, docs/ (and nothing else).
COPY --chown=1000:1000 . .

USER 1000:1000
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GRADIO_SERVER_PORT', '7860') + '/', timeout=8)"]
CMD ["python", "app.py"]
