# `make test` is the one command CI and developers run: it builds .venv on first use
# and reinstalls only when pyproject.toml changed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test install clean demo

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV)

# The first thing a new user runs: LoRA on the embedded backbone and the default built-in task.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftvision finetune --method lora --output runs/demo-$$(date +%Y%m%d-%H%M%S)
