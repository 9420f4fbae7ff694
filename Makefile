# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv, installs what
# is missing (Python packages, Debian's Fashion-MNIST), builds the extension, then runs.
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
DATA_DIR   ?= /usr/share/datasets/fashion-mnist
# onnx, onnxscript, onnxruntime: the export step (setup.py's "export" extra), used by the demo and tests.
PY_DEPS    := "torch>=2.6" torchvision triton pytest pytest-benchmark ninja timm numpy matplotlib tqdm \
              onnx onnxscript onnxruntime
PY_IMPORTS := torch, torchvision, triton, pytest, pytest_benchmark, ninja, timm, numpy, matplotlib, tqdm, \
              onnx, onnxscript, onnxruntime
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch guesses CUDA_HOME from the `nvcc` on PATH, which may be a wrapper script; setup.py asks
# nvcc for its real toolkit folder, and inductor gets the same answer from here.
CUDA_HOME  ?= $(shell nvcc --dryrun -c probe.cu -o /dev/null 2>&1 | sed -n 's/^#\$$ TOP=\(.*\)\/bin\/\.\.$$/\1/p' | head -n1)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: all venv deps data build test test-fast demo ablation bench bench-report gpu-check clean help

all: test

help:
	@echo "make demo   - PMPL demo on Fashion-MNIST (sets everything up)"
	@echo "make ablation - the paper's Table 3 on Fashion-MNIST, 3 seeds (about 2.5 h; resumable)"
	@echo "make test   - the test suite (sets everything up)"
	@echo "make bench  - latency suites into bench/results/"
	@echo "make gpu-check - on a CUDA GPU: build, the CUDA tests, the quick benchmark (< 10 min)"

$(PY):
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

deps: venv
	@$(PY) -c "import $(PY_IMPORTS)" 2>/dev/null || $(PY) -m pip install $(PY_DEPS)

data:
	@[ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ] || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

# Rebuilds when the extension is missing or stale (metapool_kernels refuses to import then).
build: deps
	@$(PY) -c "import metapool_kernels" 2>/dev/null || \
	  $(PY) -m pip install -v -e . --no-build-isolation 2>&1 | tee build.log | grep -E "nvcc|building|Successfully|rror" ; \
	  $(PY) -c "import metapool_kernels; from metapool_kernels import _extension as e; print('metapool_kernels._C ready; CUDA kernels compiled in:', e.has_cuda_kernels())"

test: build data
	$(PY) -m pytest tests -q -ra

demo: build data
	$(PY) -m metapool_kernels.demo

# The paper's Table 3 on Fashion-MNIST with three seeds (about 2.5 h on 2 cores, two runs at a time;
# run again to resume).
ABLATION_JOBS ?= 2
ablation: build data
	$(PY) -m experiments.ablation --jobs $(ABLATION_JOBS) --report bench/results/ablation

# Every suite on the device present (CUDA if torch sees one), one JSON into bench/results/, then
# bench/RESULTS.md from all of them. Knobs: BENCH_SCOPE=smoke|quick|default|full, BENCH_THREADS (thread counts, e.g. 1,all — the default),
# BENCH_DEVICE=auto|cpu|cuda, BENCH_GENOTYPE=file.json, BENCH_ARGS="-k ..." (see bench/README.md).
# The report is rendered even when a variant failed (its error is a row); the exit status is pytest's.
BENCH_ARGS ?=
bench: build
	@status=0; $(PY) -m pytest bench -q -p no:cacheprovider $(BENCH_ARGS) || status=$$?; \
	  $(PY) -m bench.report && exit $$status

bench-report:
	$(PY) -m bench.report

# On a machine with a CUDA GPU, everything that needs one, in under 10 minutes, with the Python
# whose torch already has CUDA (GPU_PYTHON; no .venv, no pip, no network: a GPU box may have
# neither, and a wheel from PyPI may not match its driver): the extension built for the GPU present
# (its CUDA kernels too), every CUDA test, and the quick CUDA benchmark (a result JSON in
# bench/results/, bench/RESULTS.md re-rendered). Each step has a deadline. Commit
# bench/results/*.json to keep the numbers.
GPU_PYTHON        ?= python3
GPU_TEST_SECONDS  ?= 300
GPU_BENCH_SECONDS ?= 150
gpu-check:
	@$(GPU_PYTHON) -c "import sys, torch, triton, pytest, pytest_benchmark; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA GPU: torch.cuda.is_available() is False for $(GPU_PYTHON)')"
	TORCH_CUDA_ARCH_LIST=$$($(GPU_PYTHON) -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
	  timeout 240 $(GPU_PYTHON) setup.py -q build_ext --inplace
	@$(GPU_PYTHON) -c "import sys; from metapool_kernels import _extension as e; sys.exit(0 if e.has_cuda_kernels() else 'the extension was built without CUDA kernels: is nvcc on PATH (or CUDA_HOME set)?')"
	timeout $(GPU_TEST_SECONDS) $(GPU_PYTHON) -m pytest tests -q -ra -k cuda -p no:cacheprovider
	@status=0; BENCH_SCOPE=quick BENCH_DEVICE=cuda BENCH_THREADS=all BENCH_DEADLINE=$(GPU_BENCH_SECONDS) \
	  timeout $$(($(GPU_BENCH_SECONDS) + 60)) $(GPU_PYTHON) -m pytest bench/test_ops_bench.py bench/test_model_bench.py \
	  -q -p no:cacheprovider || status=$$?; $(GPU_PYTHON) -m bench.report && exit $$status

clean:
	rm -rf build *.egg-info metapool_kernels/*.so build.log
