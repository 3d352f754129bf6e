# fasttf: `make demo` runs the main job, `make test` the test suite. Both set everything up first
# in a local virtual environment (.venv):
#  - a machine whose python3 already has torch with a working CUDA GPU: the venv sees that torch
#    and triton (--system-site-packages, and a .pth file naming python3's own site-packages for
#    when python3 is itself a venv) and nothing is downloaded for them;
#  - otherwise (no GPU): the CPU build of torch==$(TORCH_VERSION) (a local file on this project's
#    machines) and triton==$(TRITON_VERSION); no CUDA package is ever downloaded.
# The extension fasttf._C is built with CUDA when torch is a CUDA build and nvcc is found.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TOOLS := numpy pybind11 ninja pytest pytest-benchmark hypothesis matplotlib
# Triton kernels run under the Triton interpreter where there is no GPU.
INTERPRET = $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: install demo check test bench clean

$(VENV)/.deps:
	@if $(PYTHON) -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "fasttf: using the CUDA torch and triton of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		$(PYTHON) -c "import site, sysconfig; print(sysconfig.get_paths()['purelib'])" \
			> "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/fasttf-parent.pth"; \
	else \
		echo "fasttf: no CUDA GPU: installing torch==$(TORCH_VERSION) (CPU build) and triton==$(TRITON_VERSION)"; \
		$(PYTHON) -m venv $(VENV) && \
		$(PIP) install $(FIND_LINKS) "torch==$(TORCH_VERSION)" "triton==$(TRITON_VERSION)"; \
	fi
	$(PIP) install --upgrade pip
	$(PIP) install $(FIND_LINKS) setuptools wheel $(TOOLS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m fasttf.demo --out demo_out $(ARGS)

check: install
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m fasttf.check

test: install
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q tests
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q bench --tiny --benchmark-disable

bench: install
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest bench --benchmark-json bench/results/latest.json
	$(PY) bench/report.py bench/results/latest.json

clean:
	rm -rf build *.egg-info fasttf/_C*.so $(VENV)
