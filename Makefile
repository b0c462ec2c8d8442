# The README's commands. `make test` and `make bench` do all set-up on a fresh machine:
# a virtual environment in .venv, the dependencies, and the build of the C++ extension.
#
# torch: `pip install torch==2.13.0` takes the CPU build on a machine without CUDA here; on a GPU
# machine install a CUDA build first (e.g. `pip install torch==2.13.0` from PyPI, which is the
# CUDA 12 build on Linux) into .venv, or point VENV at an environment that has one: the build
# then also compiles csrc/cuda/*.cu.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu) setup.py
PYTEST_ARGS ?=

.PHONY: setup build test test-slow test-gpu selftest compile-check bench demo lint cuda-check info wheelhouse clean

setup: $(VENV)/.deps
build: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) setuptools wheel pybind11 ninja numpy triton faiss-cpu pytest pytest-benchmark matplotlib \
		ruff scikit-learn scipy tqdm pytorch-metric-learning inf-cl pytest-timeout
	# torchattacks, open_clip and lightly without their dependencies: their torchvision pins would
	# pull a CUDA torch (the tests load only their loss modules, tests/_peers.py).
	$(PIP) --no-deps torchattacks open-clip-torch lightly
	touch $@

$(VENV)/.built: $(VENV)/.deps $(CSRC)
	$(PIP) --no-build-isolation --no-deps -e .
	$(PY) -m fastssl info
	touch $@

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so that a busy machine
# (other jobs on the cores) does not stall the suite at every parallel region.
# On a machine with CUDA, Triton runs compiled, so the CPU tests that need its interpreter are
# skipped and listed (tests/conftest.py); a second pass runs exactly those with CUDA hidden.
INTERPRETER_TESTS := build/interpreter-tests.txt
define pytest_cpu
	@mkdir -p build && rm -f $(INTERPRETER_TESTS)
	OMP_WAIT_POLICY=PASSIVE FASTSSL_INTERPRETER_TESTS=$(INTERPRETER_TESTS) $(PY) -m pytest -m "$(1)" $(PYTEST_ARGS)
	@if [ -s $(INTERPRETER_TESTS) ]; then \
		echo "== again in Triton's interpreter, CUDA hidden: the $$(wc -l <$(INTERPRETER_TESTS)) tests skipped for it"; \
		CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 FASTSSL_ONLY_TESTS=$(INTERPRETER_TESTS) OMP_WAIT_POLICY=PASSIVE \
			$(PY) -m pytest -m "$(1)" $(PYTEST_ARGS); \
	fi
endef

test: build
	$(call pytest_cpu,not slow and not gpu)

test-slow: build
	$(call pytest_cpu,slow and not gpu)

# The GPU cases, on the compiled kernels (TRITON_INTERPRET unset).
test-gpu: build
	env -u TRITON_INTERPRET $(PY) -m pytest -m gpu $(PYTEST_ARGS)

# Every op on every backend of a device against the reference: SELFTEST_ARGS="--device cuda:0".
SELFTEST_ARGS ?=
selftest: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m fastssl selftest $(SELFTEST_ARGS)

# Every Triton kernel variant the host launches, compiled for sm_90 and sm_80 under Triton 3.6 and
# the newest (each installed once into build/compile-check/): fails on an error, a spill or too
# much shared memory (scripts/compile_check.py). COMPILE_CHECK_ARGS="--triton installed" is quicker.
COMPILE_CHECK_ARGS ?=
compile-check: build
	$(PY) scripts/compile_check.py $(COMPILE_CHECK_ARGS)

bench: build
	$(PY) -m fastssl bench --quick

# SimCLR on scikit-learn's digits (examples/simclr_digits.py): a table, examples/results/*.json and *.png.
# DEMO_ARGS: the example's options, e.g. DEMO_ARGS="--mochi --out examples/results/mochi"
DEMO_ARGS ?=
demo: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m fastssl demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Compile (no link) every CUDA source against the installed torch's headers, so CUDA code
# cannot break unseen on machines without a GPU. A CPU torch ships no c10/cuda or ATen/cuda
# headers, so .cu files include only ATen/ATen.h and the CUDA runtime, and take the CUDA stream
# from Python (torch.cuda.current_stream().cuda_stream) as an integer.
cuda-check: setup
	@for f in $(wildcard csrc/cuda/*.cu); do \
		echo "nvcc -c $$f"; \
		nvcc -std=c++20 -O2 --expt-relaxed-constexpr -c $$f -o /dev/null -DWITH_CUDA \
			$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))") \
			-I$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])") || exit 1; \
	done

# Wheels that the offline GPU machines lack (Python 3.12 there), for scripts/gpu_session.sh.
wheelhouse: setup
	$(PY) -m pip download --quiet --dest .wheels --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 faiss-cpu pytorch-metric-learning inf-cl torchattacks open-clip-torch lightly \
		pytest-timeout

info: build
	$(PY) -m fastssl info

clean:
	rm -rf build *.egg-info fastssl/_C*.so $(VENV)/.built

# pytest-benchmark over the quick sizes: one test per op and provider (benchmarks/pytest_bench.py, which
# `make test` does not collect). PYTEST_ARGS="--benchmark-autosave" saves a run under .benchmarks/,
# "--benchmark-compare" compares with the latest saved one, "--benchmark-json=FILE" writes its JSON.
.PHONY: bench-pytest
bench-pytest: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest benchmarks/pytest_bench.py --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)
