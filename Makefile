# The two README commands: `make demo` and `make test`. Both create or reuse .venv (Python 3.12)
# and install the pinned dependencies (requirements.lock pins the whole tree) before they run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REF_VENV := .venv-ref
PYTEST_WORKERS ?= 2

.PHONY: venv demo test golden bench bench-gpu clean

$(STAMP): pyproject.toml requirements.lock scripts/find_python312.sh
	@test -x $(PY) || { PY312=$$(scripts/find_python312.sh) && $$PY312 -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The training job on the embedded default (runs/default, replaced on each run), then its adapters served
# on the validation examples in one mixed-adapter serve.batch run, scored beside the training report.
DEMO := runs/default
demo: $(STAMP)
	$(PY) -m train --out $(DEMO) --overwrite
	$(PY) -m serve.batch --model tiny --lora-modules $$(cat $(DEMO)/served/lora_modules.txt) \
		-i $(DEMO)/served/requests.jsonl -o $(DEMO)/served/responses.jsonl
	$(PY) -m train.served $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# Reference outputs from HF transformers / PEFT in PyTorch (CPU torch, Python 3.11, its own venv).
# The tests read only the committed files under tests/golden; they never need torch.
$(REF_VENV)/.installed: scripts/reference-requirements.txt
	@test -x $(REF_VENV)/bin/python || python3 -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install --quiet -r scripts/reference-requirements.txt
	@touch $@

# Then the reverse direction: the adapter `save_adapter` writes (tests/adapters/jax_saved_lora.py, in .venv),
# loaded into PEFT, which records its logits for the tests to compare with.
golden: $(REF_VENV)/.installed $(STAMP)
	$(REF_VENV)/bin/python scripts/make_golden.py --out tests/golden
	$(PY) tests/adapters/jax_saved_lora.py
	$(REF_VENV)/bin/python scripts/make_golden.py --out tests/golden --saved-adapter jax_saved_lora

bench: $(STAMP)
	$(PY) -m pallas_kernels.bench

# On a GPU machine: the GPU tests and every benchmark at its GPU preset, each step time-boxed, into OUT
# (default: $$OUT from the environment, else results/bench-gpu). No venv step: such a machine may run
# jax installed system-wide (scripts/bench_gpu.sh uses .venv/bin/python where it exists, else python).
bench-gpu:
	scripts/bench_gpu.sh $(if $(OUT),'$(OUT)')

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache
