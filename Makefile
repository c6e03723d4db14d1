# upop: `make test` and `make demo` work on a fresh clone (they create .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-quick gpu-check install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel, so nothing pulls a CUDA build; [peer] is Torch-Pruning,
# the side-by-side of benchmarks/ablations.py (pure Python, tested by tests/test_peer_pruning.py);
# [onnx] is onnx, onnxruntime and onnxscript for `upop export` (tested by tests/test_export.py).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,peer,onnx,tracking]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20

demo: $(STAMP)
	$(BIN)/upop demo

# every benchmark at full size (about an hour on 2 cores); rewrites benchmarks/results and docs/results.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)
	UPOP_BENCH_RESULTS=$${UPOP_BENCH_RESULTS:-/tmp/upop-bench-quick} $(BIN)/python benchmarks/run_all.py --quick

# on a CUDA machine (about 5 minutes): named checks that judge outcomes (fp16 + clipping, latency speedup, resume,
# evaluate, ONNX export, Trainer, search throughput, every registered pair; torchrun with 2+ GPUs); writes gpu-check.json.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) build src/*.egg-info
