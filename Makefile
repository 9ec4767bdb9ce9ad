# The README's commands. Each one creates the course environment (.venv) first if it is
# missing or its requirements changed, and the environments of lesson 09 (PySyft, .venv-pysyft)
# and lesson 11 (TensorFlow Federated and Flower, .venv-tff) with their Jupyter kernels
# registered in .venv; when nothing changed those steps are skipped.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
# Where `make grade` writes grades and feedback: outside the repository on purpose.
GRADES_DIR  ?= $(or $(TMPDIR),/tmp)/private-fl-grades
SUBMISSIONS ?= examples/submissions
# Lesson 09 (PySyft) runs in its own environment; its kernel is registered in $(VENV), where
# Jupyter, nbgrader and the autograder look for it. Names as in course.toml.
PYSYFT_VENV   ?= .venv-pysyft
PYSYFT_KERNEL := fedcourse-pysyft
PYSYFT_KERNEL_DISPLAY := Python 3 (PySyft 0.9.5, lesson 09)
PYSYFT_STAMP  := $(PYSYFT_VENV)/.installed
PYSYFT_KERNEL_SPEC := $(VENV)/share/jupyter/kernels/$(PYSYFT_KERNEL)/kernel.json
# Lesson 11 (TensorFlow Federated and Flower) runs in its own environment too. TFF 0.87.0, its last
# release, needs Python 3.11 ($(TFF_PYTHON)) and pins a jaxlib the package index no longer has:
# requirements-tff.txt is a complete lock file, installed without resolving dependencies.
TFF_PYTHON    ?= $(PYTHON)
TFF_VENV      ?= .venv-tff
TFF_KERNEL    := fedcourse-tff
TFF_KERNEL_DISPLAY := Python 3.11 (TFF 0.87 and Flower, lesson 11)
TFF_STAMP     := $(TFF_VENV)/.installed
TFF_KERNEL_SPEC := $(VENV)/share/jupyter/kernels/$(TFF_KERNEL)/kernel.json
ENVS        := $(STAMP) $(PYSYFT_KERNEL_SPEC) $(TFF_KERNEL_SPEC) sandbox

.PHONY: setup sandbox test grade lab selfcheck bench generate clean

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "The course needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

$(PYSYFT_STAMP): requirements-pysyft.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "The course needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	@test -x $(PYSYFT_VENV)/bin/python || $(PYTHON) -m venv $(PYSYFT_VENV)
	$(PYSYFT_VENV)/bin/python -m pip install --quiet -r requirements-pysyft.txt
	$(PYSYFT_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@touch $@

# Registered again whenever either environment is (re)made: the spec points at $(PYSYFT_VENV)'s python.
$(PYSYFT_KERNEL_SPEC): $(PYSYFT_STAMP) $(STAMP)
	$(PYSYFT_VENV)/bin/python -m ipykernel install --prefix "$(abspath $(VENV))" \
		--name $(PYSYFT_KERNEL) --display-name "$(PYSYFT_KERNEL_DISPLAY)"
	@touch $@

# torch comes from requirements.txt, with its dependencies: the same build as the main environment's.
# TFF has wheels for Linux x86-64 and Python 3.11 only: elsewhere this environment is skipped with
# a warning, and every other lesson still works (lesson 11 then cannot be run or graded here).
$(TFF_STAMP): requirements-tff.txt requirements.txt pyproject.toml
	@if ! $(TFF_PYTHON) -c 'import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64" else 1)'; then \
		echo "WARNING: lesson 11 (TensorFlow Federated 0.87) needs Python 3.11 on Linux x86-64, so its environment"; \
		echo "         is not made and lesson 11 cannot be run or graded here (with Python 3.11 elsewhere on"; \
		echo "         this machine: make TFF_PYTHON=python3.11 ...). The other lessons are not affected."; \
	else \
		set -e; \
		test -x $(TFF_VENV)/bin/python || $(TFF_PYTHON) -m venv $(TFF_VENV); \
		$(TFF_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-tff.txt; \
		$(TFF_VENV)/bin/python -m pip install --quiet $$(grep '^torch==' requirements.txt); \
		$(TFF_VENV)/bin/python -m pip install --quiet --no-deps -e .; \
		touch $@; \
	fi

$(TFF_KERNEL_SPEC): $(TFF_STAMP) $(STAMP)
	@if [ -f $(TFF_STAMP) ]; then \
		$(TFF_VENV)/bin/python -m ipykernel install --prefix "$(abspath $(VENV))" \
			--name $(TFF_KERNEL) --display-name "$(TFF_KERNEL_DISPLAY)" && touch $@; \
	fi

# The grader runs student code in a bubblewrap sandbox. Installed here when this is a Debian or
# Ubuntu machine and we are root; otherwise grading warns loudly and runs unsandboxed (and
# `--require-sandbox`, which CI and the workflow template use, refuses to grade).
sandbox:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing bubblewrap (the grader's sandbox)"; \
		apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; \
	else \
		echo "WARNING: bubblewrap (bwrap) is not installed, so student code cannot be sandboxed when graded."; \
		echo "         Install it (Debian/Ubuntu: sudo apt-get install bubblewrap) before grading a class."; \
	fi

setup: $(ENVS)

## the tests: library, autograder, every lesson graded (what .ci/run runs)
test: $(ENVS)
	$(BIN)/python -m pytest

## the main job: grade the submissions in $(SUBMISSIONS) (one folder per student)
grade: $(ENVS)
	$(BIN)/python -m autograder grade-all $(SUBMISSIONS) --out $(GRADES_DIR)

## JupyterLab on the student version of the lessons
lab: $(ENVS)
	$(BIN)/jupyter lab lessons/ $(if $(filter 0,$(shell id -u)),--allow-root)

selfcheck: $(ENVS)
	$(BIN)/python -m autograder selfcheck

bench: $(ENVS)
	$(BIN)/python -m autograder bench

generate: $(ENVS)
	$(BIN)/python -m autograder generate

clean:
	rm -rf $(VENV) $(PYSYFT_VENV) $(TFF_VENV) .pytest_cache
