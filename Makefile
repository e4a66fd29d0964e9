# Set-up and the everyday commands. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA extension is built whenever a toolkit is found, also on a machine without a GPU.
CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

.PHONY: install demo test test-fast lint clean fashion-mnist

install: .install-stamp

# pyproject.toml is the one list of requirements: its build requirements (torch among them) first,
# then the package with its dependencies and the dev and bench extras, built against that torch.
BUILD_REQUIRES = $(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))"

.install-stamp: pyproject.toml setup.py $(wildcard cuda_ext/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $$($(BUILD_REQUIRES))
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,bench]"
	$(PY) -c "import division; print('division', division.__version__, '| CUDA kernels built:', division.cuda_extension_available())"
	touch $@

# Fashion-MNIST from the Debian package (the demo's data); a no-op when it is there.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
	         "or pass data.root=DIR with the four IDX files"; exit 1; \
	  fi; }

demo: install fashion-mnist
	$(PY) train.py experiment=demo

test: install
	$(PY) -m pytest -q --durations=10

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info division/_C*.so .install-stamp
