# auditkit: one-command set-up. `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

# torch and torchvision are left for pip to resolve together (a CUDA build that also runs on CPU);
# pinning a CPU-only torch breaks torchvision, diffusers and open_clip imports.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[models,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m auditkit.examples examples
	@echo "== scanning a candidate that undoes the safety adapter (expect RISK, exit 1)"
	-$(VENV)/bin/auditkit scan examples/jailbreak.safetensors --safety examples/safety.safetensors --static --out reports/demo-jailbreak
	@echo "== scanning a benign candidate (expect PASS, exit 0)"
	$(VENV)/bin/auditkit scan examples/benign.safetensors --safety examples/safety.safetensors --static --out reports/demo-benign
	@echo "reports: reports/demo-jailbreak/report.html reports/demo-benign/report.html"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check auditkit tests benchmarks

bench: install
	$(PY) benchmarks/static_scan.py --json benchmarks/results/static_scan.json

clean:
	rm -rf $(VENV) examples reports/demo-* .pytest_cache
