# Two commands for a new user: `make demo` (the whole pipeline offline on CPU, ~2 min after
# install) and `make test`. Both create .venv from requirements.txt if it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements
# Stage commands call `python`/`dvc`: make them the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The offline demo runs in demo/, a clone of this checkout's commit: this checkout is left as it was
# (demo/ is git-ignored here; `rm -rf demo` removes it all). A tiny Llama is built there, GSM8K-style
# problems come from reasoning-gym, runs are short. In demo/ the demo values are committed
# (params.yaml + dvc.lock, no results) so that experiments are compared against them, and the run
# is recorded as the experiment `demo`. The model path is absolute so that queued experiments
# (run in temporary clones) find it too.
DEMO := demo
# How big the demo is (tests/test_demo.py runs the same sequence with smaller ones).
DEMO_SIZES := data.num_problems=200 data.dev_size=16 train.max_length=384 train.logging_steps=2 train.eval_steps=6 \
	train.save_steps=6 evaluate.max_new_tokens=48 evaluate.batch_size=32
DEMO_SETTINGS := model.name=$(CURDIR)/$(DEMO)/models/tiny-llama data.source=gsm_symbolic $(DEMO_SIZES)

.PHONY: install demo test

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	@# torch's CUDA wheel brings Triton (the static engine's decoding kernel); its CPU build does not,
	@# and the tests run that kernel under Triton's CPU interpreter.
	$(VENV)/bin/python -c "import triton" 2>/dev/null || $(VENV)/bin/pip install -q triton==3.9.0
	touch $@

demo: $(STAMP)
	@if [ -e $(DEMO) ]; then echo "make demo: $(DEMO)/ exists (an earlier demo); rm -rf $(DEMO) to run it again" >&2; exit 2; fi
	git clone -q . $(DEMO)
	ln -s $(CURDIR)/$(VENV) $(DEMO)/$(VENV)
	@# dvc exp run commits: a clone on a machine with no git identity gets one of its own.
	cd $(DEMO) && { git config user.email >/dev/null || git config user.email demo@localhost; } && \
		{ git config user.name >/dev/null || git config user.name "make demo"; }
	cd $(DEMO) && python -m stages.tiny_model models/tiny-llama
	cd $(DEMO) && python -m stages.set_params params.yaml $(DEMO_SETTINGS)
	cd $(DEMO) && dvc repro
	cd $(DEMO) && git add params.yaml dvc.lock && git commit -qm "make demo: the demo settings"
	cd $(DEMO) && dvc exp run --quiet --name demo
	cd $(DEMO) && dvc metrics show
	@echo "make demo: done; next: cd $(DEMO) && source .venv/bin/activate (README: Two commands)"

test: $(STAMP)
	python -m pytest -q
