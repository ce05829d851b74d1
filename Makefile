# R1-style post-training pipeline. `make demo` and `make test` install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SIZE ?= tiny
RUN ?= runs/$(SIZE)
ARGS ?=
# OpenMP's wait policy stays the library's default (a short spin, then sleep) for every target: PASSIVE (sleep at
# once) made a 32-row CPU rollout 2.2x slower (1.24 vs 0.57 s: waking the threads for each of its small ops) and
# `bench/rollout.py` 4.51x instead of 5.58x (2-core EPYC, 2026-12-08). The tests set PASSIVE themselves
# (conftest.py).
# Debian packages the code sandbox needs (unshare and setpriv: namespaces, uid switch, rlimits).
SYSTEM_PACKAGES := util-linux

.PHONY: install system-deps test demo pipeline data tokenizer sft rl_reasoning rejection_sampling sft_rs reward_model rl_general evaluate bench clean
# Stages share the CPU / GPU and build each other's inputs: one at a time.
.NOTPARALLEL:

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

# One step each, in the pipeline's order: data -> tokenizer -> sft -> rl_reasoning -> rejection_sampling ->
# sft_rs -> reward_model -> rl_general (and evaluate, of any checkpoint). `make <step>` runs that step with ARGS
# (its key=value overrides) after first running, with their recipes alone, the steps it reads that are not
# finished, i.e. have no DONE in $(RUN)/<step> (the marker the stages and stages.pipeline write), e.g.
# `make rl_general` on a fresh clone runs all eight. The stage recipes read and write runs/$(SIZE), RUN's default.
STEPS := data tokenizer sft rl_reasoning rejection_sampling sft_rs reward_model rl_general
NEEDS_tokenizer := data
NEEDS_sft := tokenizer
NEEDS_rl_reasoning := sft
NEEDS_rejection_sampling := rl_reasoning
NEEDS_sft_rs := sft rejection_sampling
NEEDS_reward_model := sft_rs
NEEDS_rl_general := sft_rs reward_model
NEEDS_evaluate := data
needs = $(patsubst %,$(RUN)/%/DONE,$(NEEDS_$(1)))
# The command of each step; a stage's is `python -m stages.<step> --recipe recipes/$(SIZE)/<step>.yaml`.
CMD_data = $(PY) -m data.generate --out $(RUN)/data
CMD_tokenizer = $(PY) -m data.tokenizer --data $(RUN)/data --out $(RUN)/tokenizer
# Stage 3b, SFT on the rejection samples from the cold-start checkpoint (the pipeline's sft_rs step).
CMD_sft_rs = $(PY) -m stages.sft --recipe recipes/$(SIZE)/sft_rs.yaml
command = $(or $(CMD_$(1)),$(PY) -m stages.$(1) --recipe recipes/$(SIZE)/$(1).yaml)
# SFT from the preset (recipes/$(SIZE)/model.yaml) is given the run's tokenizer; ARGS naming model.init (a model
# dir or hub id, with its own tokenizer and chat template) keep that model's.
SCRATCH_sft = tokenizer=$(RUN)/tokenizer
MARK_DONE = $(PY) -c 'import sys; from grpo.checkpoint import mark_done; mark_done(sys.argv[1], {"step": sys.argv[2]})'

.SECONDEXPANSION:
$(STEPS) evaluate: install $$(call needs,$$@)
	$(call command,$@) $(if $(findstring model.init=,$(ARGS)),,$(SCRATCH_$@)) $(ARGS)
	$(if $(filter data tokenizer,$@),$(MARK_DONE) $(RUN)/$@ $@)

# A DONE marker that exists is complete whatever its age (as in stages.pipeline): order-only prerequisites.
$(RUN)/%/DONE: | install $$(call needs,$$*)
	$(call command,$*) $(SCRATCH_$*)
	$(if $(filter data tokenizer,$*),$(MARK_DONE) $(@D) $*)

bench: install
	$(PY) -m pip install -q -r requirements-bench.txt  # TRL: the GRPO-step anchor
	$(PY) bench/rollout.py --device cpu
	$(PY) bench/grpo_step.py --device cpu
	$(PY) bench/math_verify.py
	$(PY) bench/sandbox.py

clean:
	rm -rf runs wandb
