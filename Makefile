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

# The tests run on every core the machine gives this process (at most 8), each test file on one worker so a
# module's fixtures are built once: 16.7 -> 9.5 minutes on 2 cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")
# The toy trio is built first, on every core: left to the tests, the first worker to need it builds it with its
# share of the threads while the others wait on the lock (~4.4 instead of ~2.9 minutes on 2 cores).
test: install
	$(PY) -m harvest.toy_models
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) bench/harvest.py

# Not part of `make test`: checks that export-circuit-tracer's output works in circuit-tracer itself (numbers,
# attribute()). circuit-tracer pins transformers 4 and transformer-lens 2-3, so it gets a venv of its own; torch
# is pinned there too, or pip would pull a CUDA build. 6-11 minutes on 2 cores the first time.
# A venv of its own for another tool: $(call tool_venv,FOLDER,PACKAGE==VERSION), torch pinned to the CPU wheel.
define tool_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(1)/constraints.txt
	$(1)/bin/python -m pip install --quiet -c $(1)/constraints.txt $(2)
	touch $(1)/.installed
endef

CT_VENV ?= .venv-circuit-tracer
CT_VERSION ?= 0.5.0
$(CT_VENV)/.installed:
	$(call tool_venv,$(CT_VENV),circuit-tracer==$(CT_VERSION))

interop-circuit-tracer: install $(CT_VENV)/.installed
	$(PY) interop/circuit_tracer_check.py all --build --ct-python $(CT_VENV)/bin/python

# Not part of `make test` either: checks that export-saelens's output runs in SAELens itself, on the model as
# SAELens loads it (hook activations, encode/forward, latents once attached). sae-lens needs transformer-lens < 4,
# so it gets a venv of its own, torch pinned as above. A few minutes on 2 cores the first time.
SL_VENV ?= .venv-saelens
SL_VERSION ?= 6.54.12
$(SL_VENV)/.installed:
	$(call tool_venv,$(SL_VENV),sae-lens==$(SL_VERSION))

interop-saelens: install $(SL_VENV)/.installed
	$(PY) interop/saelens_check.py all --build --sl-python $(SL_VENV)/bin/python

# Both checks.
interop: interop-circuit-tracer interop-saelens

clean-demo:
	rm -rf caches/toy-diff caches/toy-prose-diff runs/demo-toy-code runs/demo-toy-prose
