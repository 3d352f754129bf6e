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
# The optional extras the tests cover: setup.py's extras_require (fasttf[transformers]).
EXTRAS := "transformers>=5.17,<6"
# torch.compile's cache inside the venv, not the machine-wide /tmp/torchinductor_$USER: a cache made by
# another checkout whose fasttf ops had other signatures fails the compile tests (make clean clears it).
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/$(VENV)/torchinductor
# Triton kernels run under the Triton interpreter where there is no GPU.
INTERPRET = $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
SOURCES := setup.py $(wildcard csrc/*.py csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

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
	$(PIP) install $(FIND_LINKS) setuptools wheel $(TOOLS) $(EXTRAS)
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

# make compat: fasttf on the newest torch (README, "Supported versions"), in a second venv that
# `make test`'s never sees: torch==$(COMPAT_TORCH) and torchvision==$(COMPAT_TORCHVISION) (CUDA
# builds that run on the CPU), every package from the machine's local wheel folders where it has
# them (pip --no-index: nothing downloaded, CUDA packages included; tests/compat/torch_requirements.py
# says which of torch's requirements is left out and why); fasttf built there from a copy of the
# sources with FASTTF_CUDA=0 (the C++ standard follows that torch: csrc/cxx_standard.py), then
# tests/compat (every op's smoke test, nn.Transformer and torchvision's VisionTransformer swapped)
# under the Triton interpreter, strict. The venv is made once per version pair (its stamp file);
# fasttf is rebuilt there when its sources change.
COMPAT_VENV ?= .venv-compat
COMPAT_TORCH ?= 2.14.1
COMPAT_TORCHVISION ?= 0.29.1
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PIP := $(COMPAT_PY) -m pip --disable-pip-version-check -q
COMPAT_WHEELS := $(wildcard /opt/wheels /opt/pypi/files /opt/pypi-more/files)
COMPAT_FROM := $(if $(COMPAT_WHEELS),--no-index $(addprefix --find-links ,$(COMPAT_WHEELS)),)
COMPAT_TOOLS := numpy pybind11 ninja pytest packaging setuptools wheel
COMPAT_DEPS := $(COMPAT_VENV)/.deps-torch$(COMPAT_TORCH)-torchvision$(COMPAT_TORCHVISION)
PACKAGE_SOURCES := $(SOURCES) pyproject.toml $(wildcard fasttf/*.py fasttf/*/*.py fasttf/data/* kernels/*.py)

.PHONY: compat

$(COMPAT_DEPS):
	@echo "fasttf compat: a venv $(COMPAT_VENV) with torch==$(COMPAT_TORCH), torchvision==$(COMPAT_TORCHVISION)"
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PIP) install $(COMPAT_FROM) --no-deps "torch==$(COMPAT_TORCH)" "torchvision==$(COMPAT_TORCHVISION)"
	$(COMPAT_PIP) install $(COMPAT_FROM) $(COMPAT_TOOLS)
	$(COMPAT_PY) tests/compat/torch_requirements.py torch torchvision > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PIP) install $(COMPAT_FROM) -r $(COMPAT_VENV)/requirements.txt
	touch $@

# Built from a copy, not in place: an in-place build would replace the fasttf/_C*.so that .venv's
# editable install (another torch) loads.
$(COMPAT_VENV)/.built: $(COMPAT_DEPS) $(PACKAGE_SOURCES)
	rm -rf $(COMPAT_VENV)/src && mkdir -p $(COMPAT_VENV)/src
	tar -c --exclude='*.so' --exclude=__pycache__ setup.py pyproject.toml csrc fasttf kernels | tar -x -C $(COMPAT_VENV)/src
	@echo "fasttf compat: building fasttf._C with $$($(COMPAT_PY) csrc/cxx_standard.py 2>/dev/null)"
	cd $(COMPAT_VENV)/src && FASTTF_CUDA=0 ../bin/python -m pip --disable-pip-version-check -q install \
		--no-build-isolation --no-deps .
	touch $@

# bin/pytest, not python -m pytest: the repository root must not be on sys.path, so that fasttf is
# the one installed in $(COMPAT_VENV), built against its torch. tests/test_cuda_sources.py: nvcc on
# the .cu files and the CUDA dispatch against this torch's CUDA headers, with the same standard.
compat: $(COMPAT_VENV)/.built
	cd $(COMPAT_VENV) && bin/python -c "import sys, torch, torchvision, triton, fasttf; \
		print(f'fasttf compat: Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision ' \
		      f'{torchvision.__version__}, triton {triton.__version__}, fasttf from {fasttf.__file__}')"
	TRITON_INTERPRET=1 FASTTF_STRICT=1 $(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider tests/compat tests/test_cuda_sources.py
