# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the project into it and, when run as root,
# installs the Debian peers the tests use (scripts/install-debian-packages.sh).

VENV    ?= .venv
PYTHON  ?= python3
STAMP   := $(VENV)/.installed
# Two workers per core: the long tests are real-time sessions, HIL links and process
# kills that mostly sleep (13:31 with 4 workers on 2 cores, 23:09 with 2, same 719 tests).
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))

.PHONY: demo test test-loaded mutation cli-docs lint format debian-packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

debian-packages:
	@bash scripts/install-debian-packages.sh

demo: $(STAMP) debian-packages
	$(VENV)/bin/tdw-emu demo --interrupt 2:40

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
# --dist worksteal: a worker that ran out of tests takes queued ones from the other (with
# the default 'load', one core idled for minutes while the other worked through its queue).
test: $(STAMP) debian-packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The suite beside a busy loop pinned to one core: it must pass on a loaded machine too.
test-loaded:
	bash .ci/run-loaded

# Mutation testing of profiles/ (benchmarks/mutation.py): prints survivors and the score.
MUTATION_JOBS ?= 6
mutation: $(STAMP) debian-packages
	$(VENV)/bin/python benchmarks/mutation.py --jobs $(MUTATION_JOBS)

cli-docs: $(STAMP)
	$(VENV)/bin/python -m emulator.cli_help > docs/cli.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
