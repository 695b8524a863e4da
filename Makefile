# auditkit: one-command set-up. `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser demo demo-sd15 test test-fast lint bench clean

# torch and torchvision are left for pip to resolve together (a CUDA build that also runs on CPU);
# pinning a CPU-only torch breaks torchvision, diffusers and open_clip imports.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[models,dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# the demo's expected verdicts were measured with the lab's first (destructive) ESD-u Safety LoRA; the faithful
# defaults are in auditkit/lab/assets/adapters/ (issue 24: their re-measurement is a later step)
LAB_SAFETY := auditkit/lab/assets/adapters/safety-esd-u-destructive.safetensors

# The lab demo: benign fine-tuning on top of a shipped Safety LoRA, and the same fine-tuning done
# modularly, each scanned (static + dynamic) against the safety adapter (a few minutes on 2 CPU cores).
demo: install
	$(VENV)/bin/auditkit lab make-data --domain neon --n 400 --out examples/neon
	$(VENV)/bin/auditkit finetune --base lab --data examples/neon --mode on-top --safety $(LAB_SAFETY) --out examples/on-top.safetensors
	$(VENV)/bin/auditkit finetune --base lab --data examples/neon --mode modular --out examples/modular.safetensors
	-$(VENV)/bin/auditkit scan examples/on-top.safetensors --safety $(LAB_SAFETY) --base lab --multipliers 1 --out reports/demo-on-top
	-$(VENV)/bin/auditkit scan examples/modular.safetensors --safety $(LAB_SAFETY) --base lab --multipliers 1 --out reports/demo-modular
	-$(VENV)/bin/auditkit repair examples/on-top.safetensors --safety $(LAB_SAFETY) --data examples/neon --base lab --from-scan reports/demo-on-top --method auto --out repairs/demo-on-top
	@echo "reports: reports/demo-on-top/report.html (expect RISK) reports/demo-modular/report.html (expect PASS)"
	@echo "repair:  repairs/demo-on-top/report.html (before RISK; --method auto keeps the passing repair that keeps the most"
	@echo "         of the neon domain; adapter pack in repairs/demo-on-top/pack, every method tried in repairs/demo-on-top/tried)"

# SD1.5-shaped example adapters made by code: a candidate that undoes the safety adapter, one that does not.
demo-sd15: install
	$(PY) -m auditkit.examples examples
	-$(VENV)/bin/auditkit scan examples/jailbreak.safetensors --no-config --safety examples/safety.safetensors --static --out reports/demo-jailbreak
	-$(VENV)/bin/auditkit scan examples/benign.safetensors --no-config --safety examples/safety.safetensors --static --out reports/demo-benign

# Debian's chromium for the report's browser test (the test skips, saying why, where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: the browser test will be skipped"

# Tests run single-threaded (tests/conftest.py), so one worker per core; a module stays on one worker (its
# fixtures are made once). TEST_WORKERS=1 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: install browser
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(VENV)/bin/ruff check auditkit tests benchmarks

bench: install
	$(PY) benchmarks/static_scan.py --json benchmarks/results/static_scan.json

clean:
	rm -rf $(VENV) examples reports/demo-* .pytest_cache
