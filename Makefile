# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install into it (once; re-installed when requirements change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is on the team's machines; installing it first keeps pip
# from pulling a multi-GB CUDA build to satisfy the open range in requirements.txt.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in default, no network: toy trio -> harvest -> diffing crosscoders
# (toy-code, and the toy-prose control) -> analysis reports; prints a five-line summary. Resumes.
demo: install
	$(PY) demo.py

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/harvest.py

clean-demo:
	rm -rf caches/toy-diff caches/toy-prose-diff runs/demo-toy-code runs/demo-toy-prose
