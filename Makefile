# Short names for the README's commands. Everything runs offline on the CPU with the tiny model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU build first, so nothing pulls a CUDA one
	$(PY) -m pip install -q -r requirements-dev.txt -e .   # the pins, the test tools, and qwen_sft itself
	$(PY) -c "from qwen_sft.llama_cpp import download_sdist; download_sdist()"  # llama.cpp's converter, for --gguf
	touch $@

setup: $(VENV)/.installed  ## create .venv with the pinned CPU stack and the test tools

demo: setup  ## the whole pipeline on the tiny model, offline, in demo/
	PYTHON=$(abspath $(PY)) bash scripts/demo_cpu.sh

lint: setup  ## ruff, with the rules in pyproject.toml
	$(VENV)/bin/ruff check .

test: setup  ## the test suite, offline, on the CPU, in 2 workers, a file's tests on one (module fixtures run once)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf demo .pytest_cache
