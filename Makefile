# The README's quick start: `make demo` runs the main job, `make test` the tests.
# Both install fastted and its dependencies into the current Python first
# (scripts/install.sh; an installed torch is kept), once per change of setup.py.
PYTHON ?= python3
STAMP := .make/installed-$(shell $(PYTHON) -c "import sys; print(sys.prefix.replace('/', '_'))")

.PHONY: demo test bench install

demo: $(STAMP)
	$(PYTHON) -m fastted pipeline

test: $(STAMP)
	$(PYTHON) -m pytest tests benchmarks --benchmark-disable -q

bench: $(STAMP)
	$(PYTHON) -m pytest benchmarks

install: $(STAMP)

$(STAMP): setup.py scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	@mkdir -p .make && touch $@
