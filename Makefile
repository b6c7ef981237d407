# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install into it (once; re-installed when requirements change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is on the team's machines; installing it first keeps pip
# from pulling a multi-GB CUDA build to satisfy the open range in requirements.txt.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench interop interop-circuit-tracer interop-saelens clean-demo

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

# Not part of `make test`: checks that export-circuit-tracer's output works in circuit-tracer itself (numbers,
# attribute()). circuit-tracer pins transformers 4 and transformer-lens 2-3, so it gets a venv of its own; torch
# is pinned there too, or pip would pull a CUDA build. 6-11 minutes on 2 cores the first time.
CT_VENV ?= .venv-circuit-tracer
CT_VERSION ?= 0.5.0
$(CT_VENV)/.installed:
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CT_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(CT_VENV)/constraints.txt
	$(CT_VENV)/bin/python -m pip install --quiet -c $(CT_VENV)/constraints.txt circuit-tracer==$(CT_VERSION)
	touch $@

interop-circuit-tracer: install $(CT_VENV)/.installed
	$(PY) interop/circuit_tracer_check.py all --build --ct-python $(CT_VENV)/bin/python

# Not part of `make test` either: checks that export-saelens's output runs in SAELens itself, on the model as
# SAELens loads it (hook activations, encode/forward, latents once attached). sae-lens needs transformer-lens < 4,
# so it gets a venv of its own, torch pinned as above. A few minutes on 2 cores the first time.
SL_VENV ?= .venv-saelens
SL_VERSION ?= 6.54.12
$(SL_VENV)/.installed:
	$(PYTHON) -m venv $(SL_VENV)
	$(SL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SL_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(SL_VENV)/constraints.txt
	$(SL_VENV)/bin/python -m pip install --quiet -c $(SL_VENV)/constraints.txt sae-lens==$(SL_VERSION)
	touch $@

interop-saelens: install $(SL_VENV)/.installed
	$(PY) interop/saelens_check.py all --build --sl-python $(SL_VENV)/bin/python

# Both checks.
interop: interop-circuit-tracer interop-saelens

clean-demo:
	rm -rf caches/toy-diff caches/toy-prose-diff runs/demo-toy-code runs/demo-toy-prose
