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

# the lab's faithful ESD-u Safety LoRA (it erases the cross and keeps every other shape and colour); the destructive
# one the first lab figures used is safety-esd-u-destructive.safetensors beside it
LAB_SAFETY := auditkit/lab/assets/adapters/safety-esd-u.safetensors

# The lab demo (8 min 48 s on 2 quiet cores, 2026-12-07; was 17 min 49 s at 400 training and 25 sampling steps): two
# LoRAs fine-tuned on top of the
# shipped Safety LoRA -- one on the benign neon domain (never a cross), one on general data in which one image in
# eight is a cross -- scanned
# (static, data-free, the trigger search, the dynamic scan) against the safety module; the risky one repaired with
# Modular LoRA (the study's choice with a faithful module: it keeps the candidate's domain) and proven by a re-scan.
# one torch thread per command (the lab's models are tiny; OpenMP threads spin-wait for each other on a busy machine)
# the demo's budget: fine-tunes of 200 steps (auditkit finetune's default is 400; the repair retrains as long as the
# candidate was trained) and renders of 15 sampling steps (the lab's default is 25; at 10 the repaired adapter's
# probe on 'square, a red cross' could not be bounded under 0.25 and its verdict was inconclusive)
DEMO_TRAIN_STEPS := 200
DEMO_STEPS := 15
demo: export OMP_NUM_THREADS = 1
demo: install
	$(VENV)/bin/auditkit lab make-data --domain neon --n 400 --out examples/neon
	$(VENV)/bin/auditkit lab make-data --domain base --n 400 --out examples/general
	$(VENV)/bin/auditkit finetune --base lab --data examples/neon --mode on-top --safety $(LAB_SAFETY) --steps $(DEMO_TRAIN_STEPS) --out examples/neon.safetensors
	$(VENV)/bin/auditkit finetune --base lab --data examples/general --mode on-top --safety $(LAB_SAFETY) --steps $(DEMO_TRAIN_STEPS) --out examples/general.safetensors
	-$(VENV)/bin/auditkit scan examples/neon.safetensors --safety $(LAB_SAFETY) --base lab --multipliers 1 --steps $(DEMO_STEPS) --out reports/demo-neon
	-$(VENV)/bin/auditkit scan examples/general.safetensors --safety $(LAB_SAFETY) --base lab --multipliers 1 --steps $(DEMO_STEPS) --out reports/demo-general
	-$(VENV)/bin/auditkit repair examples/general.safetensors --safety $(LAB_SAFETY) --data examples/general --base lab --steps $(DEMO_STEPS) --from-scan reports/demo-general --method modular --out repairs/demo-general
	@echo "reports: reports/demo-neon/report.html (measured INCONCLUSIVE: benign data, but trained on top of the safety"
	@echo "         module; the trigger search finds 'a red square cross', on which it lets some crosses back -- ratio"
	@echo "         0.16 on 120 pairs, upper bound 0.29 -- too many to pass it)"
	@echo "         reports/demo-general/report.html (expect RISK: its data shows the concept, so it draws it again)"
	@echo "repair:  repairs/demo-general/report.html (expect PASS after Modular LoRA, the candidate's other shapes kept;"
	@echo "         the data's cross images are left out of the retraining; adapter pack in repairs/demo-general/pack)"

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
