# R1-style post-training pipeline. `make demo` and `make test` install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SIZE ?= tiny
RUN ?= runs/$(SIZE)
ARGS ?=
# Idle OpenMP threads spin by default, which on a small CPU costs more than the work itself.
export OMP_WAIT_POLICY ?= PASSIVE
# Debian packages the code sandbox needs (unshare and setpriv: namespaces, uid switch, rlimits).
SYSTEM_PACKAGES := util-linux

.PHONY: install system-deps test demo pipeline data tokenizer sft rl_reasoning rejection_sampling reward_model rl_general evaluate bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-deepspeed.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	touch $@

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "missing system packages: $$missing (install them with your package manager)"; exit 1; fi; \
	fi

test: install
	$(PY) -m pytest -q $(ARGS)

# The embedded default end to end: data -> tokenizer -> the four stages -> report, on the CPU.
demo: install
	$(PY) -m stages.pipeline --recipe recipes/tiny/pipeline.yaml $(ARGS)

pipeline: install
	$(PY) -m stages.pipeline --recipe recipes/$(SIZE)/pipeline.yaml $(ARGS)

data: install
	$(PY) -m data.generate --out $(RUN)/data $(ARGS)

tokenizer: install
	$(PY) -m data.tokenizer --data $(RUN)/data --out $(RUN)/tokenizer $(ARGS)

sft rl_reasoning rejection_sampling reward_model rl_general evaluate: install
	$(PY) -m stages.$@ --recipe recipes/$(SIZE)/$@.yaml $(ARGS)

bench: install
	$(PY) -m pip install -q -r requirements-bench.txt  # TRL: the GRPO-step anchor
	$(PY) bench/rollout.py --device cpu
	$(PY) bench/grpo_step.py --device cpu
	$(PY) bench/math_verify.py
	$(PY) bench/sandbox.py

clean:
	rm -rf runs wandb
