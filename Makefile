# Two commands for a new user: `make demo` (the whole pipeline offline on CPU, ~2 min after
# install) and `make test`. Both create .venv from requirements.txt if it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements
# Stage commands call `python`/`dvc`: make them the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The offline demo: a tiny Llama built locally, GSM8K-style problems from reasoning-gym. The model
# path is absolute so that queued experiments (run in temporary clones) find it too. The demo sets
# these values in params.yaml (in place: `git diff params.yaml` shows just them) and records the run
# as the experiment `demo`; `git checkout params.yaml` goes back to the real 8B run.
DEMO_MODEL := models/tiny-llama
DEMO_SETTINGS := model.name=$(CURDIR)/$(DEMO_MODEL) data.source=gsm_symbolic data.num_problems=300 \
	data.dev_size=20 train.max_length=384 train.logging_steps=2 train.eval_steps=10 \
	train.save_steps=10 evaluate.max_new_tokens=48 evaluate.batch_size=32

.PHONY: install demo test clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(DEMO_MODEL): | $(STAMP)
	python -m stages.tiny_model $(DEMO_MODEL)

demo: $(STAMP) $(DEMO_MODEL)
	python -m stages.set_params params.yaml $(DEMO_SETTINGS)
	dvc exp run --force --name demo
	dvc metrics show

test: $(STAMP)
	python -m pytest -q

clean-demo:
	rm -rf $(DEMO_MODEL)
