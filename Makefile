# The README's two commands: `make demo` (the main job, end to end, on the CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; a GPU machine sets TORCH_SPEC to its CUDA build (or an already installed torch).
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/demo

.PHONY: setup demo test clean

$(BIN)/resdeploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/resdeploy

demo: setup
	$(BIN)/resdeploy models
	$(BIN)/resdeploy train --arch resnet20 --data mnist --epochs 20 --out $(RUN)/checkpoint

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
