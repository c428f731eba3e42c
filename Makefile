# Set-up lives here so that the README's two commands work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/poisonsweep demo

# Two pytest workers, one file at a time each: the sweeps' waits (Ray and server start-up,
# actor imports, the fault tests' kills) overlap the other worker's training. One torch thread
# per process, and OpenMP threads that sleep rather than spin, so that two trainings share the
# two cores instead of fighting over them.
TEST_ENV := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

test: install
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -n 2 --dist loadfile

clean:
	rm -rf $(VENV) poisonsweep_results
