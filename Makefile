# Each target makes .venv (with everything installed) if it is missing, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test parity bench clean

# Everything, at the versions CI tests (constraints.txt); `pip install .` alone is the JAX side.
# pip byte-compiles what it installs on one core; compileall does the same on every core, but for
# the installed packages' own test suites (a third of the files), which nothing here imports. It
# skips the one file that torch ships in Python 3.12 syntax, as pip does, hence `|| true`.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-compile -c constraints.txt -e '.[torch,test]'
	$(PY) -m compileall -qq -j 0 -x '/tests/' $(VENV)/lib || true
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m unet_jax.train

# Two workers, each taking whole test modules (their fixtures are module-scoped): much of the
# suite is compiling and starting processes, which keeps one core busy rather than two. In the
# order of collection, which tests/conftest.py sets: the modules with slow tests first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

parity: $(STAMP)
	$(PY) -m parity --dtype float64
	$(PY) -m parity --dtype float32

bench: $(STAMP)
	$(PY) -m benchmarks

# The environment and pytest's cache; never runs/, which holds the trained runs and the classifier.
clean:
	rm -rf $(VENV) .pytest_cache
