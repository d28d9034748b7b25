# The README's quick start: `make demo` runs the main job, `make test` the tests.
# Both install fastted and its dependencies into the current Python first (scripts/install.sh, at the
# versions of constraints.txt; an installed torch is kept), once per change of what the install reads.
PYTHON ?= python3
STAMP := .make/installed-$(shell $(PYTHON) -c "import sys; print(sys.prefix.replace('/', '_'))")

.PHONY: demo test smoke lint bench install check-latest wheel-check lock

demo: $(STAMP)
	$(PYTHON) -m fastted pipeline

test: $(STAMP)
	$(PYTHON) -m pytest tests benchmarks --benchmark-disable -q

# The smoke subset (tests/smoke.txt): imports, each fused loss on both paths, `fastted --help`, the tiny pipeline.
smoke: $(STAMP)
	$(PYTHON) -m pytest $$(grep -v '^#' tests/smoke.txt) --benchmark-disable -q

# ruff's lint and format check, and the import contract (.importlinter): what .ci/run and pre-commit run.
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.argv = ['lint-imports']; lint_imports_command()"

bench: $(STAMP)
	$(PYTHON) -m pytest benchmarks

install: $(STAMP)

# A fresh environment of the newest releases setup.py admits, and the smoke subset in it (scripts/check_latest.sh).
check-latest:
	bash scripts/check_latest.sh

# The wheel and sdist built, installed into a fresh environment and used from outside the clone.
wheel-check:
	bash scripts/wheel_check.sh

# constraints.txt rewritten from the environment of $(PYTHON) (after a passing check-latest: PYTHON=.ci/venv-latest/bin/python).
lock:
	bash scripts/lock.sh

$(STAMP): setup.py scripts/install.sh constraints.txt
	PYTHON=$(PYTHON) bash scripts/install.sh
	@mkdir -p .make && touch $@
