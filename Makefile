# The README's commands. Each one creates the course environment (.venv) first if it is
# missing or its requirements changed; when nothing changed that step is skipped.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
# Where `make grade` writes grades and feedback: outside the repository on purpose.
GRADES_DIR  ?= $(or $(TMPDIR),/tmp)/private-fl-grades
SUBMISSIONS ?= examples/submissions

.PHONY: setup test grade lab selfcheck bench generate clean

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "The course needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

setup: $(STAMP)

## the tests: library, autograder, every lesson graded (what .ci/run runs)
test: $(STAMP)
	$(BIN)/python -m pytest

## the main job: grade the submissions in $(SUBMISSIONS) (one folder per student)
grade: $(STAMP)
	$(BIN)/python -m autograder grade-all $(SUBMISSIONS) --out $(GRADES_DIR)

## JupyterLab on the student version of the lessons
lab: $(STAMP)
	$(BIN)/jupyter lab lessons/ $(if $(filter 0,$(shell id -u)),--allow-root)

selfcheck: $(STAMP)
	$(BIN)/python -m autograder selfcheck

bench: $(STAMP)
	$(BIN)/python -m autograder bench

generate: $(STAMP)
	$(BIN)/python -m autograder generate

clean:
	rm -rf $(VENV) .pytest_cache
