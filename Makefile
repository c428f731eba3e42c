# Set-up lives here so that the README's two commands work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install demo lint docs test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/poisonsweep demo

# Two pytest processes side by side, each one torch thread with OpenMP threads that sleep
# rather than spin: the sweeps' waits (Ray and server start-up, actor imports, the fault
# tests' kills) overlap the other process's training. SHARD_A holds the long training tests
# and the browser test (about half the suite's time, measured); every other test file runs in
# the second process.
# (pytest-xdist's --dist loadfile queued files behind the longest one and left a worker idle.)
TEST_ENV := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
SHARD_A  := tests/e2e/test_attacks_e2e.py tests/sweeps/test_budget.py tests/trainers/test_trial.py \
            tests/sweeps/test_pareto.py tests/sweeps/test_defenses_table.py tests/trainers/test_distributed.py \
            tests/e2e/test_defenses_pretrained_e2e.py tests/e2e/test_browser.py tests/e2e/test_out_of_memory.py \
            tests/e2e/test_zeroshot.py tests/sweeps/test_api.py tests/e2e/test_report_browser.py tests/e2e/test_moasha_e2e.py \
            tests/sweeps/test_tune_fixes.py

# the docstrings' examples run too (the packages' modules, beside tests/)
DOCTESTS := --doctest-modules tests poison trainers sweeps

# ruff first (pyproject.toml's [tool.ruff.lint]): a lint error fails the suite before it starts
lint: install
	$(VENV)/bin/ruff check .

# the documentation site, strictly: a broken link or a page missing from mkdocs.yml's nav fails it,
# and so does a config reference that no longer matches the code's models
docs: install
	$(PY) docs/gen_config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .site

test: install lint docs
	@$(TEST_ENV) $(PY) -X faulthandler -m pytest $(SHARD_A) > .test-shard-a.log 2>&1 & a=$$!; \
	$(TEST_ENV) $(PY) -X faulthandler -m pytest $(addprefix --ignore=,$(SHARD_A)) $(DOCTESTS); b=$$?; \
	wait $$a; a=$$?; echo; echo "=== $(SHARD_A)"; cat .test-shard-a.log; \
	echo "exit status: shard A $$a, the rest $$b"; test $$a -eq 0 -a $$b -eq 0

test-fast: install lint docs
	$(TEST_ENV) $(PY) -X faulthandler -m pytest -m "not slow" $(DOCTESTS)

clean:
	rm -rf $(VENV) poisonsweep_results .site
