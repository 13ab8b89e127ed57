"""searchr1: Search-R1 on one GPU. The CLI and the training loop that wires the chapters together.

    retriever.py  BM25 over a Wikipedia-style corpus          (chapter 1: the search engine)
    rollout.py    the policy writes, searches, reads, answers (chapter 2: trajectories)
    grpo.py       group advantages, clipped loss, KL          (chapter 3: the update)
    ppo.py        critic, GAE, value loss (--algo ppo)        (chapter 3b: the paper's other update)
    eval.py       exact match, QA data                        (chapter 4: the reward)
    searchr1.py   Config, model loading, train_step, checkpoints, CLI (this file)

One training step (`train_step`, below) is the whole algorithm:
    rollout -> reward (EM) -> group advantages -> reference log-probs -> clipped loss + KL -> AdamW
(--algo ppo: one response per question, and the critic replaces the group as the baseline: ppo.py)

Where this departs from the paper's setup (Jin et al. 2025, arXiv 2503.09516) and why:
- The policy is a 4-bit NF4 base with a LoRA adapter (QLoRA), not full fine-tuning on 8 GPUs:
  it has to fit one 24 GB card. The reference policy is the same base with the adapter switched
  off, so the weights are held once. LoRA wants a larger learning rate than full fine-tuning.
- The batch is smaller (32 questions x 5 responses, not 512 x 5) and the run shorter (50 steps, not
  1,005) to fit the budget of ~3 hours.
- The search engine is BM25 (tantivy) in-process, not E5 dense retrieval on a second GPU.
- Each step reseeds the sampler from (seed, step): a resumed run samples what the
  uninterrupted run would have, so no RNG state has to be saved.
"""
import sys


def require_python(version=sys.version_info) -> None:
    """searchr1 runs on Python 3.11 or newer (hashlib.file_digest, among others): say so, not a traceback."""
    if version < (3, 11):
        sys.exit(f"searchr1 needs Python 3.11 or newer; this is Python {'.'.join(map(str, version[:3]))}")


require_python()

import argparse  # noqa: E402 (after the version check: what follows may need 3.11)
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from eval import (BENCHMARKS, METHODS, TRAIN_SETS, DataError, baseline_prompt, em_table, exact_match,
                  extract_answer, load_qa, prediction, save_predictions, saved_predictions, summarize,
                  write_atomic)
import grpo
import plan
import ppo
import tiny
from grpo import Batch, batch_logprobs, group_advantages
from ppo import CRITIC, add_critic, param_groups
from retriever import BM25Index, CorpusError, format_passages
from rollout import RolloutConfig, build_prompt, encode_prompt, pad_id, rollout
from search_api import RemoteIndex, SearchUnavailable, serve

# Short names for the usual models; any hub id or local folder works as --model too.
MODELS = {
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",  # the design target
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
}
WIKI18 = ("PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz")  # hub dataset, file (README: the data)
# The presets, the only defaults besides Config's and COMMAND_DEFAULTS (shown in `train --help`);
# flags given on the command line still win.
# `--model tiny` and `--model tiny-multihop` (tiny.py): a 0.6M-parameter model trained on a CPU in
# minutes. Turns are ~15 tokens, hence the short budget; one passage per fact, ranked first by its
# query, hence top-1. 80 trajectories a step in mini-batches of 8: 10 optimizer steps a batch, as in
# the reference. LoRA lr 3e-4: held-out EM reaches 1.0 by step ~5; 1e-3 (right for 2 optimizer steps
# a batch) drove the KL above 1 and EM fell back to 0.66. The default 2 search turns are the two
# lookups of a multi-hop question. On the CPU even where a GPU is visible: README's numbers were made
# in float32 there, and a 0.6M-parameter model gains nothing from a GPU (--device cuda still takes one).
TINY = dict(device="cpu", load_4bit=False, gradient_checkpointing=False, steps=20, batch_size=16, mini_batch_size=8,
            micro_batch_size=40, lr=3e-4, warmup_ratio=0.0, max_new_tokens=32, topk=1, eval_every=5,
            eval_batch_size=200, save_every=20, critic_lr=3e-3)
# --model tiny --algo ppo: n = 1, so 80 questions a step sample the same 80 trajectories as GRPO's 16 x 5
TINY_PPO = dict(batch_size=80)


def presets_help() -> str:
    settings = lambda preset: ", ".join(f"{flag(k)} {v}" for k, v in preset.items())  # noqa: E731
    return (f"presets: --model tiny (or tiny-multihop) sets {settings(TINY)}; "
            f"with --algo ppo also {settings(TINY_PPO)}")


def opt(default, help):
    """A Config field whose help text is also its documentation on the command line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- what to train on
    model: str = opt("qwen2.5-3b", "alias (see MODELS), hub id or local folder")
    train_data: str = opt("", "FlashRAG JSONL of training questions; empty = NQ + HotpotQA train from the hub")
    eval_data: str = opt("", "FlashRAG JSONL of held-out questions; empty = eval_size questions held out of train_data")
    corpus: str = opt("", "Search-R1 JSONL(.gz) corpus; empty = wiki-18 from the hub (21M passages)")
    index_dir: str = opt("", "where the BM25 index lives; empty = a cache folder keyed by the corpus path")
    search_url: str = opt("", "a Search-R1 retrieval server (http://host:8000/retrieve) searched instead of "
                              "the corpus, e.g. an E5 dense index; empty = in-process BM25")
    out_dir: str = opt("", "run folder (checkpoints, metrics.jsonl); empty = runs/<model>")
    chat: str = opt("auto", "prompt style: 'auto' (the tokenizer's chat template when it has one, base models "
                            "included, as the reference does), 'yes' or 'no' (plain text)")
    # --- the policy: QLoRA
    load_4bit: bool = opt(True, "NF4 4-bit base weights (bitsandbytes): 3B fits in ~2 GB instead of ~6")
    lora_r: int = opt(16, "LoRA rank: 16 adapts all projections with ~30M parameters on 3B")
    lora_alpha: int = opt(32, "LoRA scale alpha / r = 2, the common choice")
    lora_dropout: float = opt(0.0, "0: dropout would make the trainer's log-probs differ from the sampler's")
    lora_targets: str = opt("all-linear", "modules given adapters: every linear projection, as QLoRA does")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward: ~4x less activation memory")
    # --- GRPO (README: the reference recipe)
    steps: int = opt(50, "training steps of a run: 50 x 32 x 5 trajectories, 3-5 hours on a 24 GB card by "
                         "arithmetic (docs/gpu.md); the reference: 1,005")
    batch_size: int = opt(32, "questions per step, sized with --steps for a run of hours (reference: 512 on 8 GPUs)")
    group_size: int = opt(5, "responses per question, G in the advantage (paper: 5); PPO samples 1")
    mini_batch_size: int = opt(16, "trajectories per optimizer step: 32 x 5 / 16 = 10 steps a batch, the "
                                   "reference's 10 (2,560 / 256)")
    rollout_batch_size: int = opt(0, "questions per rollout call, their KV cache held at once; 0 = the largest the "
                                     "memory plan fits on the GPU (16 on the CPU)")
    micro_batch_size: int = opt(0, "trajectories per forward/backward; 0 = the largest the memory plan fits (8 on "
                                   "the CPU)")
    gpu_memory_gb: float = opt(0.0, "GPU memory to plan for (e.g. 16 or 24 to plan for a smaller card); 0 = the "
                                    "visible GPU's")
    lr: float = opt(2e-5, "AdamW learning rate: LoRA needs ~10-20x the paper's full fine-tuning 1e-6")
    warmup_ratio: float = opt(0.285, "share of steps with linear warm-up (reference: 0.285), then constant")
    weight_decay: float = opt(0.01, "AdamW weight decay (reference: 0.01, torch's AdamW default)")
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm")
    clip_eps: float = opt(0.2, "PPO clip range epsilon")
    kl_coef: float = opt(0.001, "beta, weight of the low-variance KL to the reference policy")
    entropy_coef: float = opt(0.001, "weight of the entropy bonus in the actor loss (reference: 0.001)")
    mask_observations: bool = opt(True, "retrieved-token masking; --no-mask-observations is the paper's ablation")
    rollout_weights: str = opt("adapter", "what training's rollout samples from: 'adapter' (the 4-bit base and LoRA "
                                          "adapter, as the update computes) or 'merged' (a 16-bit copy of the base "
                                          "with the adapter merged in, made before each rollout and freed after: one "
                                          "matmul a linear; +2 bytes a weight while it lives, so only where the "
                                          "memory plan fits it)")
    old_logprobs: str = opt("recompute", "pi_old: 'recompute' (a forward pass after the rollout, as the reference) or "
                                         "'rollout' (the sampler's own log-probs: one pass fewer; in 4-bit they may "
                                         "drift from a fresh pass, which bench.py gpu measures)")
    # --- PPO (ppo.py): --algo ppo adds a critic and samples one response per question
    algo: str = opt("grpo", "'grpo' (group baseline) or 'ppo' (critic baseline; one response per question, as in the paper)")
    critic_lr: float = opt(2e-4, "critic LoRA + value head learning rate: 10x the actor's, the paper's ratio (1e-5 vs 1e-6)")
    critic_warmup_ratio: float = opt(0.015, "share of steps with linear warm-up of the critic's lr (reference: 0.015)")
    gae_gamma: float = opt(1.0, "GAE discount gamma (paper: 1, the reward comes only at the end)")
    gae_lambda: float = opt(1.0, "GAE lambda (paper: 1: advantage = return - value)")
    value_clip: float = opt(0.5, "how far one update may move a value from the one GAE used (paper: 0.5)")
    # --- rollout (README: the reference recipe)
    max_turns: int = opt(2, "search turns before the forced final answer turn (reference: 2 in training, 4 in "
                            "eval and ask)")
    max_new_tokens: int = opt(500, "tokens the policy may sample in one turn")
    max_obs_tokens: int = opt(500, "tokens of an <information> block before it is truncated")
    topk: int = opt(3, "passages per search")
    temperature: float = opt(1.0, "sampling temperature while training (paper: 1.0)")
    top_p: float = opt(0.95, "nucleus sampling while training (reference: 0.95); log-probs use the full softmax")
    # --- bookkeeping
    eval_every: int = opt(25, "steps between evaluations on the held-out set (0 = only at the end)")
    eval_size: int = opt(200, "held-out questions evaluated, greedy")
    eval_batch_size: int = opt(32, "questions per greedy evaluation rollout")
    save_every: int = opt(10, "steps between checkpoints")
    keep_checkpoints: int = opt(0, "checkpoints kept, the newest; 0 = every one (Qwen2.5-3B: 0.36 GB each)")
    samples: int = opt(4, "trajectories a step written out in full to samples.jsonl (a seeded choice); 0 = none")
    seed: int = opt(0, "seeds data order and sampling")
    device: str = opt("auto", "'auto' (CUDA if present), 'cuda' or 'cpu'")
    dtype: str = opt("auto", "compute dtype: 'auto' (bfloat16 on GPUs that have it, float16 with loss scaling on "
                             "older ones: T4, V100, RTX 20xx; float32 on the CPU), 'bfloat16', 'float16' or 'float32'")
    resume: bool = opt(False, "continue out_dir's run from its last checkpoint (the same settings; --steps may grow)")
    overwrite: bool = opt(False, "start over in an out_dir that holds a run, deleting its checkpoints, metrics, "
                                 "samples and evaluations")

    def rollout_config(self, greedy: bool = False) -> RolloutConfig:
        return RolloutConfig(max_turns=self.max_turns, max_new_tokens=self.max_new_tokens,
                             max_obs_tokens=self.max_obs_tokens, top_p=self.top_p,
                             temperature=0.0 if greedy else self.temperature,
                             n_samples=1 if greedy else self.samples_per_question)

    @property
    def samples_per_question(self) -> int:
        """Responses sampled per question: GRPO's group, or 1 for PPO, whose critic is the baseline
        (the reference's PPO: n = 1)."""
        return 1 if self.algo == "ppo" else self.group_size

    def check(self) -> None:
        """Every setting in its range, before any work is done: the first one that is not is a UsageError."""
        for name, allowed in {"chat": ("auto", "yes", "no"), "algo": ("grpo", "ppo"),
                              "dtype": ("auto", "bfloat16", "float16", "float32"),
                              "old_logprobs": ("recompute", "rollout"), "rollout_weights": ("adapter", "merged")}.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{flag(name)} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UsageError(f"--device {self.device!r}: choose auto, cpu, cuda or cuda:N")
        rules = [  # (fields, test, what the value must be)
            (("steps", "batch_size", "mini_batch_size", "lora_r", "lora_alpha", "max_new_tokens", "max_obs_tokens", "topk", "eval_size", "eval_batch_size",
              "save_every", "group_size"), lambda v: v >= 1, "at least 1"),
            (("max_turns", "eval_every", "keep_checkpoints", "samples", "micro_batch_size", "rollout_batch_size",
              "gpu_memory_gb"), lambda v: v >= 0, "at least 0"),
            (("lr", "critic_lr", "temperature", "max_grad_norm", "clip_eps", "value_clip"), lambda v: v > 0,
             "above 0"),
            (("kl_coef", "entropy_coef", "weight_decay"), lambda v: v >= 0, "at least 0"),
            (("warmup_ratio", "critic_warmup_ratio", "gae_gamma", "gae_lambda"), lambda v: 0 <= v <= 1,
             "between 0 and 1"),
            (("top_p",), lambda v: 0 < v <= 1, "above 0 and at most 1"),
            (("lora_dropout",), lambda v: 0 <= v < 1, "at least 0 and below 1"),
        ]
        for fields, ok, must_be in rules:  # `not ok(v)` also catches nan
            for name in fields:
                if not ok(getattr(self, name)):
                    raise UsageError(f"{flag(name)} {getattr(self, name)}: must be {must_be}")
        if self.old_logprobs == "rollout" and not self.mask_observations:
            raise UsageError("--old-logprobs rollout needs retrieved-token masking: retrieved tokens were not "
                             "sampled, so the rollout has no log-probs for them")
        if self.algo == "grpo" and self.group_size < 2:
            raise UsageError(f"--group-size {self.group_size}: GRPO compares at least 2 responses per question "
                             "(or use --algo ppo)")


def flag(name: str) -> str:
    """The command-line flag of a Config field: max_turns -> --max-turns."""
    return "--" + name.replace("_", "-")


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


class NothingToDo(Exception):
    """The command has nothing left to do (a finished run resumed): printed as one line, exit code 0."""


# ----------------------------------------------------------------------------- model and data
def resolve_model(name: str) -> str:
    if name in MODELS or Path(name).exists():
        return MODELS.get(name, name)
    if "/" not in name:
        raise UsageError(f"unknown model {name!r}: use a hub id (org/name), a local folder, "
                         f"or one of {', '.join(MODELS)}")
    return name


def pick_device(cfg: Config) -> torch.device:
    """--device; under torchrun a process's GPU is the one its LOCAL_RANK names."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible (check nvidia-smi and the torch build)")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg.device == "auto" or cfg.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(cfg.device)


# ----------------------------------------------------------------------------- several GPUs: torchrun
# `torchrun --nproc_per_node N searchr1.py ...` starts N processes (ranks); a plain `python searchr1.py`
# is rank 0 of 1 and none of this does anything. Each rank rolls out its share of the step's
# questions (whole GRPO groups, so advantages need nothing from other ranks); the loss's token count
# and the LoRA gradients are summed over the ranks, so every rank takes the optimizer step one process
# would take on all the questions. Rank 0 alone writes files and evaluates.

def world() -> tuple[int, int]:
    """(rank, number of ranks): torchrun's, or (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# The longest a rank waits at a collective: while rank 0 alone builds wiki-18's index on the first run
# (21M passages at ~41 s a million: ~15 min) or evaluates (200 greedy questions: minutes on a GPU). NCCL's
# default, 10 minutes, would end the run there.
TIMEOUT = datetime.timedelta(hours=1)


def backend(device_type: str) -> str:
    """The process group's backend for ranks computing on `device_type`. On GPUs, NCCL reduces the
    gradients (CUDA tensors) and gloo the scalar sums and barriers (CPU tensors): NCCL reduces only
    CUDA tensors, so a group of NCCL alone fails at the first sum of a Python number."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(cfg: Config) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, the backend for this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = pick_device(cfg)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend(device.type), timeout=TIMEOUT)


def all_sum(value: float) -> float:
    """The sum of `value` over the ranks (itself with one process), through the group's CPU backend."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item()


def sum_gradients(parameters) -> None:
    """Each rank's gradient is its share of the mini-batch's token mean: their sum is the whole's.
    An explicit all-reduce rather than DDP's wrapper: PPO switches peft adapters between forward
    passes, and the sum reads as the maths it is."""
    if dist.is_initialized():
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def rank_share(questions: list[dict], cfg: Config) -> list[dict]:
    """This rank's questions of the step: of each optimizer step's questions, its 1/N, in order, so
    that mini-batch k of every rank together is mini-batch k of one process."""
    rank, size = world()
    per_update = cfg.mini_batch_size // cfg.samples_per_question  # questions an optimizer step covers
    share = per_update // size
    return [q for first in range(0, len(questions), per_update)
            for q in questions[first + rank * share: first + (rank + 1) * share]]


def memory_plan(cfg: Config, shape: plan.Shape, gb: float, dtype_bytes: int, prompt_tokens: int) -> plan.Plan:
    """plan.memory_plan for this run's settings: a rollout or micro-batch size given (not 0) is kept."""
    response = (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens  # the budget
    return plan.memory_plan(
        shape, gb, load_4bit=cfg.load_4bit, dtype_bytes=dtype_bytes, lora_rank=cfg.lora_r,
        adapters=2 if cfg.algo == "ppo" else 1, questions=cfg.batch_size,
        samples_per_question=cfg.samples_per_question, mini_batch_size=cfg.mini_batch_size,
        prompt_tokens=prompt_tokens, response_tokens=response, new_tokens=max(prompt_tokens, cfg.max_obs_tokens + 1),
        eval_batch_size=cfg.eval_batch_size, rollout_weights=cfg.rollout_weights,
        rollout_batch_size=cfg.rollout_batch_size, micro_batch_size=cfg.micro_batch_size)


def fit_to_memory(cfg: Config, model, tokenizer, questions: list[dict], device) -> Config:
    """The rollout chunk and micro-batch left at 0 (auto): the largest that plan.memory_plan fits in the
    GPU (or --gpu-memory-gb), the plan printed; without a GPU, 16 questions and 8 trajectories."""
    gb = cfg.gpu_memory_gb or (torch.cuda.get_device_properties(device).total_memory / 2**30
                               if device.type == "cuda" else 0)
    if not gb:
        return dataclasses.replace(cfg, rollout_batch_size=cfg.rollout_batch_size or 16,
                                   micro_batch_size=cfg.micro_batch_size or 8)
    chat = uses_chat_template(cfg, tokenizer)
    prompt = max(len(build_prompt(q["question"], tokenizer, chat)) for q in questions[:1000])
    budget = memory_plan(cfg, plan.Shape.of(model.config.get_text_config()), gb,
                         pick_dtype(cfg, device)[0].itemsize, prompt)
    if world()[0] == 0:
        tqdm.write(budget.table())
    if not budget.fits:
        raise UsageError(f"the plan does not fit {gb:g} GB (peak {budget.peak_gb:.1f} GB): lower --rollout-batch-size, "
                         "--micro-batch-size or --eval-batch-size, or the length budgets (--max-new-tokens, --max-obs-tokens, "
                         "--max-turns), or use a card with more memory")
    return dataclasses.replace(cfg, rollout_batch_size=budget.rollout_batch_size,
                               micro_batch_size=budget.micro_batch_size, rollout_weights=budget.rollout_weights)


def pick_dtype(cfg: Config, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype the base model computes in, and why. LoRA weights, their gradients and AdamW's state
    stay float32 whatever it is (peft keeps adapters in float32 on a 16-bit base)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), f"--dtype {cfg.dtype}"
    if device.type != "cuda":
        return torch.float32, "the CPU computes in float32"
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):  # T4, V100, RTX 20xx only emulate it
        return torch.bfloat16, f"{name} has bfloat16"
    return torch.float16, f"{name} has no bfloat16: float16, with loss scaling against underflow"


def load_policy(cfg: Config, device: torch.device):
    """The tokenizer and the trainable policy: (4-bit) base + LoRA adapter, on `device`."""
    # bitsandbytes' CPU backend (imported by peft) logs that an optional kernel package is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    path = resolve_model(cfg.model)
    dtype, _ = pick_dtype(cfg, device)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype) if cfg.load_4bit else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device})
    if cfg.load_4bit and device.type == "cpu":
        # bitsandbytes 0.50 repacks a 4-bit weight for fast CPU inference the first time its layer
        # runs in eval mode (the rollout), and the repacked layout then fails in backward: keep one
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:  # activation_checkpointing_enable from transformers 5.23; the old name warns
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a question it has deprecated: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    if cfg.algo == "ppo":  # the critic: a second adapter and a value head on the same base (ppo.py)
        add_critic(model)
    return tokenizer, model


def merged_copy(model, dtype: torch.dtype):
    """A plain copy of the policy in the compute dtype for sampling, the adapter merged in:
    W = dequantize(W_nf4) + (alpha / r) B A for every linear, so a decode step runs one matmul a linear
    instead of a dequantize, the 4-bit matmul and two LoRA matmuls. The embeddings, norms and output
    layer are the policy's own tensors, shared, not copied."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    policy = grpo.causal_lm(model)
    weights, merged = dict(policy.state_dict()), []
    for name, module in policy.named_modules():
        adapted = isinstance(module, LoraLayer)
        base = module.get_base_layer() if adapted else module
        quantized = hasattr(getattr(base, "weight", None), "quant_state")
        if any(name.startswith(done + ".") for done in merged) or not (adapted or quantized):
            continue
        weight = base.weight
        if quantized:  # NF4, unpacked to the compute dtype as its own matmul unpacks it
            import bitsandbytes.functional
            weight = bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
        if adapted:
            weight = weight + module.get_delta_weight(model.active_adapter).to(weight.dtype)  # + (alpha / r) B A
        weights = {key: value for key, value in weights.items() if not key.startswith(name + ".")}
        weights[name + ".weight"] = weight.to(dtype)
        if base.bias is not None:
            weights[name + ".bias"] = base.bias
        merged.append(name)
    with torch.device("meta"):  # no memory until the weights are put in
        copy = AutoModelForCausalLM.from_config(policy.config, dtype=dtype)
    copy.load_state_dict(weights, assign=True)
    for name, buffer in policy.named_buffers():  # RoPE's frequencies are not in the state dict
        module, _, key = name.rpartition(".")
        copy.get_submodule(module)._buffers[key] = buffer
    copy.generation_config = policy.generation_config  # the EOS ids a turn ends at
    return copy.eval()


@contextlib.contextmanager
def sampling_model(model, cfg: Config, device):
    """What the rollout samples from (--rollout-weights): the policy itself, or its merged copy, freed after."""
    if cfg.rollout_weights == "adapter":
        yield model
        return
    copy = merged_copy(model, pick_dtype(cfg, device)[0])
    try:
        yield copy
    finally:
        del copy
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the copy's memory back for the update


def uses_chat_template(cfg: Config, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template. 'auto' follows the reference's dataset
    code: the template whenever the tokenizer has one, base models included (Qwen2.5 base ships one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat == "yes" and not has_template:
        raise UsageError(f"--chat yes, but the tokenizer of {cfg.model} has no chat template: use --chat no or auto")
    return has_template if cfg.chat == "auto" else cfg.chat == "yes"


def load_questions(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) questions. Without eval_data, eval_size questions are held out of train."""
    if cfg.train_data:
        train = load_qa(cfg.train_data)
    else:
        train = [row for name, split in TRAIN_SETS for row in load_qa(name, split)]
    if cfg.eval_data:
        return train, load_qa(cfg.eval_data)[: cfg.eval_size]
    random.Random(cfg.seed).shuffle(train)
    if len(train) <= cfg.eval_size:
        raise UsageError(f"{len(train)} training questions cannot spare {cfg.eval_size} for "
                         "evaluation: give --eval-data or a smaller --eval-size")
    return train[cfg.eval_size:], train[: cfg.eval_size]


def open_index(cfg: Config) -> BM25Index:
    """The BM25 index of cfg.corpus (wiki-18 from the hub when empty), built on first use."""
    corpus = cfg.corpus
    if not corpus:
        from huggingface_hub import hf_hub_download
        corpus = hf_hub_download(WIKI18[0], WIKI18[1], repo_type="dataset")
    return BM25Index.open(corpus, index_dir=cfg.index_dir or None)


def make_search(cfg: Config):
    """The search callable the rollout sees: queries -> formatted top-k passages, one per query."""
    index = RemoteIndex(cfg.search_url) if cfg.search_url else open_index(cfg)
    return lambda queries: [format_passages(hits) for hits in index.search(queries, k=cfg.topk)]


# ----------------------------------------------------------------------------- one step
def pack(trajectories, advantages: torch.Tensor, pad: int, mask_observations: bool, device) -> Batch:
    """Trajectories -> a Batch on `device`, rows laid out [left pad | prompt | response | right pad].

    The loss is taken over the tokens the policy sampled (each trajectory's loss_mask), or with
    mask_observations off (the ablation) over every real response token, retrieved ones included.
    """
    P = max(len(t.prompt_ids) for t in trajectories)
    R = max(len(t.response_ids) for t in trajectories)
    B = len(trajectories)
    input_ids = torch.full((B, P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    loss_mask, sampled_logp = torch.zeros(B, R), torch.zeros(B, R)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, P - p: P + r] = torch.tensor(t.prompt_ids + t.response_ids)
        attention_mask[i, P - p: P + r] = 1
        loss_mask[i, :r] = torch.tensor(t.loss_mask if mask_observations else [1] * r, dtype=torch.float)
        sampled_logp[i, :r] = torch.tensor(t.logprobs)  # what the sampler saw; 0.0 at observations
    return Batch(input_ids.to(device), attention_mask.to(device), P, loss_mask.to(device), advantages.to(device),
                 old_logp=sampled_logp.to(device))


def cut(items: list, size: int) -> list[list]:
    """Consecutive pieces of `size` items (the last may be shorter)."""
    return [items[i: i + size] for i in range(0, len(items), size)]


def clock(device) -> float:
    """time.time() once the GPU has run the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def train_step(model, tokenizer, optimizer, questions, search, cfg: Config, device, scaler=None):
    """One GRPO (or PPO) step: rollout -> reward -> advantages -> reference log-probs -> update.

    scaler: a torch.amp.GradScaler when the base computes in float16 (losses scaled up so small
    gradients survive float16, unscaled before clipping), else None.
    Returns (stats for metrics.jsonl, the trajectories (N,) prompt-major, their rewards (N,))."""
    t0 = clock(device)
    # 1. rollout: G responses per question from the current policy (trajectories prompt-major)
    model.eval()
    chat = uses_chat_template(cfg, tokenizer)
    prompts = [build_prompt(q["question"], tokenizer, chat) for q in questions]
    with sampling_model(model, cfg, device) as sampler:
        trajectories = [t for chunk in cut(prompts, cfg.rollout_batch_size)   # chunks bound the KV cache
                        for t in rollout(sampler, tokenizer, chunk, search, cfg.rollout_config())]
    t_rollout = clock(device)
    # 2. reward: r = EM(extracted answer, golden answers), 1 or 0
    golden = [q["golden_answers"] for q in questions for _ in range(cfg.samples_per_question)]
    rewards = torch.tensor([exact_match(extract_answer(t.text), g) for t, g in zip(trajectories, golden)])
    # 3. GRPO's advantages: A_i = (r_i - mean_group) / (std_group + 1e-6), one per trajectory (N,)
    #    (PPO replaces them with its critic's, per token, in step 4)
    advantages = group_advantages(rewards, cfg.samples_per_question)
    # 4. mini-batches of cfg.mini_batch_size trajectories (one optimizer step each), cut into
    #    micro-batches, with pi_old (the policy that sampled: recomputed, or as the rollout recorded it)
    #    and pi_ref (adapter off) log-probs
    updates, pad = [], pad_id(tokenizer)
    with torch.no_grad():
        for mini in cut(list(zip(trajectories, advantages)), cfg.mini_batch_size):
            updates.append([pack([t for t, _ in chunk], torch.stack([a for _, a in chunk]), pad,
                                 cfg.mask_observations, device) for chunk in cut(mini, cfg.micro_batch_size)])
        drift = []  # |log pi_sampler - log pi_old| a sampled token: what --old-logprobs rollout would change
        for batch in (batch for mini_batch in updates for batch in mini_batch):
            if cfg.old_logprobs == "recompute":  # else keep the rollout's: one forward pass fewer
                recomputed = batch_logprobs(model, batch, cfg.temperature)                   # (b, R)
                if cfg.mask_observations:  # loss_mask = the sampled tokens, whose log-probs the sampler kept
                    drift.append((recomputed - batch.old_logp)[batch.loss_mask.bool()].abs())
                batch.old_logp = recomputed
            with model.disable_adapter():
                batch.ref_logp = batch_logprobs(model, batch, cfg.temperature)
    batches = [batch for mini_batch in updates for batch in mini_batch]
    batch_stats = ppo.token_advantages(model, batches, rewards, cfg) if cfg.algo == "ppo" else {}
    t_logprob = clock(device)
    # 5. update: each mini-batch is one optimizer step; its micro-batches accumulate gradients.
    #    The two algorithms differ only in the loss of a micro-batch (PPO adds its critic's).
    model.train()
    backward = lambda loss: (scaler.scale(loss) if scaler else loss).backward()  # noqa: E731
    batch_loss = functools.partial(ppo.batch_loss, backward=backward) if cfg.algo == "ppo" else grpo.batch_loss
    sums, grad_norms = {}, []
    for mini_batch in updates:
        # the token mean's count, over every rank's share of the mini-batch
        n_tokens = max(all_sum(sum(batch.loss_mask.sum().item() for batch in mini_batch)), 1.0)
        for batch in mini_batch:
            loss, stats = batch_loss(model, batch, n_tokens, cfg)
            backward(loss)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
        sum_gradients(p for group in optimizer.param_groups for p in group["params"])  # torchrun: over ranks
        if scaler:
            scaler.unscale_(optimizer)
        # clip each parameter group on its own (PPO: the actor's, the critic's); log the actor's norm
        norms = [torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm).item()
                 for group in optimizer.param_groups]
        grad_norms.append(norms[0])
        if scaler:  # a step whose gradients overflowed float16 is skipped, and the scale lowered
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t_end = clock(device)
    # means over the step's trajectories and trained tokens (torchrun: every rank's)
    n, n_trained = all_sum(len(trajectories)), all_sum(sum(batch.loss_mask.sum().item() for batch in batches))
    per_trajectory = lambda values: all_sum(sum(values)) / n  # noqa: E731
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    stats = {"reward": per_trajectory(rewards.tolist()),
             "searches": per_trajectory(t.n_searches for t in trajectories),
             "turns": per_trajectory(t.n_turns for t in trajectories),
             "answered": per_trajectory(t.answered for t in trajectories),
             "response_len": per_trajectory(len(t.response_ids) for t in trajectories),
             **{key: all_sum(value) / max(n_trained, 1) for key, value in sums.items()}, **batch_stats,
             "grad_norm": sum(grad_norms) / len(grad_norms),
             **({"logp_drift": all_sum(torch.cat(drift).sum().item()) / max(n_trained, 1),
                 "logp_drift_max": torch.cat(drift).max().item()} if drift else {}),
             # seconds by phase: rollout; reward, pi_old and pi_ref log-probs (PPO: and critic values);
             # optimisation
             "rollout_s": t_rollout - t0, "logprob_s": t_logprob - t_rollout, "update_s": t_end - t_logprob,
             "step_s": t_end - t0, "tokens_per_s": sampled / max(t_rollout - t0, 1e-9)}
    return stats, trajectories, rewards


def evaluate(model, tokenizer, questions, search, cfg: Config, desc: str = "eval", prompts=None) -> list[dict]:
    """Greedy rollouts, batched: one eval.prediction row per question (eval.summarize averages them).

    prompts(batch of questions) -> their prompt token ids; None = Search-R1's prompt (rollout.build_prompt).
    """
    model.eval()
    chat = uses_chat_template(cfg, tokenizer)
    prompts = prompts or (lambda batch: [build_prompt(q["question"], tokenizer, chat) for q in batch])
    predictions = []
    for i in tqdm(range(0, len(questions), cfg.eval_batch_size), desc=desc, leave=False):
        batch = questions[i: i + cfg.eval_batch_size]
        for t, q in zip(rollout(model, tokenizer, prompts(batch), search, cfg.rollout_config(greedy=True)), batch):
            predictions.append(prediction(q, t.text, t.queries, t.answered))
    return predictions


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, keep: int = 0, scaler=None):
    """Atomic: write checkpoints/step-N.tmp, rename it, then repoint latest.json (os.replace).
    keep: how many of the newest checkpoints stay; 0 = all."""
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)                       # the LoRA adapter, in peft's format
    if CRITIC in model.peft_config:                  # PPO: the critic adapter went to tmp/critic/; its head
        from safetensors.torch import save_file
        save_file(model.value_head.state_dict(), tmp / "value_head.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                **({"scaler": scaler.state_dict()} if scaler else {})}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest.json", json.dumps({"step": step, "path": final.name}))
    if keep:                                         # only the newest `keep` (names sort by step)
        for old in sorted(root.glob("step-??????"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_adapter(model, folder: Path, adapter: str = "default"):
    """Put the LoRA weights saved in `folder` (peft's adapter_model.safetensors) into `model`'s
    adapter named `adapter` (the policy's, or PPO's critic)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"), adapter_name=adapter)
    missing = [key for key in result.missing_keys if "lora_" in key and f".{adapter}." in key]  # this adapter's
    if missing or result.unexpected_keys:
        raise UsageError(f"{folder}: the adapter does not fit this model ({len(missing)} LoRA weights "
                         f"missing, {len(result.unexpected_keys)} unexpected): was it trained on another base?")


def load_checkpoint(run: Path, model, optimizer, scheduler, scaler=None) -> int:
    """Restore adapter, optimizer and scheduler from the last checkpoint; returns its step."""
    latest = run / "checkpoints" / "latest.json"
    if not latest.exists():
        raise UsageError(f"--resume: no checkpoint in {run} (looked for {latest})")
    ckpt = run / "checkpoints" / json.loads(latest.read_text())["path"]
    load_adapter(model, ckpt)
    if CRITIC in model.peft_config:  # PPO: the critic adapter (peft's subfolder) and the value head
        from safetensors.torch import load_file
        load_adapter(model, ckpt / CRITIC, CRITIC)
        model.value_head.load_state_dict(load_file(ckpt / "value_head.safetensors"))
    # weights_only: the unpickler accepts tensors and plain containers only, never code
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return state["step"]


# ----------------------------------------------------------------------------- the run
def batch_at(train: list[dict], step: int, cfg: Config) -> list[dict]:
    """The questions of step `step`: a seeded permutation per epoch, so resuming needs no state."""
    per_epoch = len(train) // cfg.batch_size
    if per_epoch == 0:
        raise UsageError(f"{len(train)} training questions are fewer than --batch-size {cfg.batch_size}")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return [train[j] for j in order[i * cfg.batch_size: (i + 1) * cfg.batch_size].tolist()]


def make_scheduler(optimizer, cfg: Config, steps: int):
    """Linear warm-up over a share of the steps, then constant (the reference's 'constant' style): the
    lr of step s is lr x (s + 1) / W for the first W = ratio x steps steps (at least 1). PPO's critic,
    the second parameter group, has its own shorter warm-up (reference: actor 0.285, critic 0.015)."""
    def warmup(ratio: float):
        warmup_steps = max(1, int(ratio * steps))
        return lambda s: min(1.0, (s + 1) / warmup_steps)
    ratios = [cfg.warmup_ratio, cfg.critic_warmup_ratio][: len(optimizer.param_groups)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [warmup(ratio) for ratio in ratios])


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# What a run folder holds besides config.json; --overwrite deletes these (tiny's task/ stays).
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval", "metrics.png")
# Settings a resumed run may change: how long it runs, how often it saves and reports, and how the
# same work is cut for memory. Any other difference changes what the run computes.
RESUMABLE = {"steps", "resume", "overwrite", "out_dir", "save_every", "keep_checkpoints", "eval_every",
             "eval_batch_size", "rollout_batch_size", "micro_batch_size", "samples", "device", "index_dir",
             "search_url", "rollout_weights"}


def check_run_folder(run: Path, cfg: Config, derived: tuple = ()) -> None:
    """Before any work: a folder that holds a run is continued (--resume, same settings) or started
    over (--overwrite), never overwritten by accident. derived: settings not compared (tiny's paths)."""
    latest = run / "checkpoints" / "latest.json"
    if not cfg.resume:
        if not cfg.overwrite and any((run / name).exists() for name in RUN_FILES[:2]):
            raise UsageError(f"{run} holds a run already: continue it with --resume, or start it over with "
                             "--overwrite (which deletes its checkpoints and metrics)")
        return
    if not latest.is_file():
        raise UsageError(f"--resume: no checkpoint in {run} (looked for {latest})")
    saved = json.loads((run / "config.json").read_text())
    ignored = RESUMABLE | set(derived)
    differ = [f"{flag(k)} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
              if k not in ignored and k in saved and saved[k] != v]
    if differ:
        raise UsageError(f"--resume: settings differ from the run in {run}: {'; '.join(differ)} "
                         "(resume with the run's settings, or give a new --out-dir)")
    step = json.loads(latest.read_text())["step"]
    if cfg.steps <= step:
        raise NothingToDo(f"{run} is at step {step} of --steps {cfg.steps}: nothing to do "
                          f"(a larger --steps trains on)")


def sample_rows(step: int, questions, trajectories, rewards, tokenizer, cfg: Config) -> list[dict]:
    """A seeded choice of cfg.samples trajectories, written out whole: what the policy wrote,
    what the search engine returned (the `segments` alternate), its queries, answer and reward."""
    chosen = sorted(random.Random(cfg.seed * 1_000_003 + step).sample(range(len(trajectories)),
                                                                      min(cfg.samples, len(trajectories))))
    rows = []
    for i in chosen:
        t, q = trajectories[i], questions[i // cfg.samples_per_question]
        segments, start = [], 0  # runs of equal loss_mask: 1 = written by the policy, 0 = inserted
        # (passages, or the invalid-action message: "search" for both)
        for end in range(1, len(t.loss_mask) + 1):
            if end == len(t.loss_mask) or t.loss_mask[end] != t.loss_mask[start]:
                by = "policy" if t.loss_mask[start] else "search"
                segments.append({"by": by, "text": tokenizer.decode(t.response_ids[start:end])})
                start = end
        rows.append({"step": step, "question": q["question"], "golden_answers": q["golden_answers"],
                     "segments": segments, "queries": t.queries, "answer": extract_answer(t.text),
                     "reward": rewards[i].item()})
    return rows


def train(cfg: Config) -> dict:
    """Train; returns the last evaluation. Writes out_dir/config.json, metrics.jsonl, samples.jsonl,
    eval/step-N.json (each evaluation's predictions) and checkpoints/."""
    resolve_model(cfg.model)  # an unknown alias fails now, not after the data has loaded
    device = pick_device(cfg)
    if device.type == "cpu" and cfg.model in MODELS and cfg.device == "auto":
        raise UsageError(f"{cfg.model} needs a CUDA GPU and none is visible; try --model tiny "
                         "(a tiny search agent that trains on a CPU in minutes) or --device cpu")
    rank, ranks = world()
    if ranks > 1 and (cfg.mini_batch_size % (cfg.samples_per_question * ranks)
                      or cfg.batch_size % (cfg.mini_batch_size // cfg.samples_per_question)):
        raise UsageError(f"with {ranks} processes, --mini-batch-size must be a multiple of {ranks} x the responses "
                         f"per question ({cfg.samples_per_question}) and divide --batch-size x them, so that each "
                         f"rank takes whole questions of every optimizer step (e.g. --mini-batch-size "
                         f"{cfg.samples_per_question * ranks * 2})")
    run = Path(cfg.out_dir or f"runs/{Path(cfg.model).name}")
    check_run_folder(run, cfg)  # every rank reads the folder; rank 0 alone writes to it
    # the warm-up stays where it was set: steps only grow the run (--resume --steps N)
    schedule_steps = json.loads((run / "config.json").read_text())["steps"] if cfg.resume else cfg.steps
    train_qs, eval_qs = load_questions(cfg)
    if rank == 0:
        if cfg.overwrite and not cfg.resume:
            for name in RUN_FILES:
                path = run / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        search = make_search(cfg)  # builds the index the first time, once
    if ranks > 1:
        dist.barrier()  # the other ranks open the index rank 0 built (memory-mapped: the pages are shared)
        search = make_search(cfg) if rank else search
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: same seed, same run (on every rank)
    tokenizer, model = load_policy(cfg, device)
    cfg = fit_to_memory(cfg, model, tokenizer, train_qs, device)
    dtype, why = pick_dtype(cfg, device)
    if rank == 0:
        tqdm.write(f"compute dtype: {str(dtype).removeprefix('torch.')} ({why}); LoRA weights and AdamW in float32")
    trainable = (param_groups(model, cfg.lr, cfg.critic_lr) if cfg.algo == "ppo"  # actor, critic
                 else [p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, schedule_steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    start = load_checkpoint(run, model, optimizer, scheduler, scaler) if cfg.resume else 0
    for name in ("metrics.jsonl", "samples.jsonl") if rank == 0 else ():  # forget rows after the checkpoint
        path = run / name
        rows = [json.loads(line) for line in path.open()] if cfg.resume and path.exists() else []
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["step"] <= start))

    stop = []  # Ctrl-C once: finish this step, save, exit; twice: exit now
    def on_interrupt(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        tqdm.write("interrupted: saving after this step (Ctrl-C again to quit without saving)")
    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    save = lambda step: save_checkpoint(run, step, model, optimizer, scheduler, cfg.keep_checkpoints,  # noqa: E731
                                        scaler)
    result = {}
    try:
        bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps, disable=rank > 0)
        # torchrun: each rank's share of a mini-batch is 1/N of it
        rank_cfg = dataclasses.replace(cfg, mini_batch_size=cfg.mini_batch_size // ranks)
        for step in bar:
            torch.manual_seed(cfg.seed * 1_000_003 + step + 100_003 * rank)  # this step's sampling, reproducible
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            questions = rank_share(batch_at(train_qs, step, cfg), cfg)
            try:
                stats, trajectories, rewards = train_step(model, tokenizer, optimizer, questions, search, rank_cfg,
                                                          device, scaler)
            except SearchUnavailable:  # raised in the rollout, before any update: `step` steps are intact
                if rank == 0:
                    save(step)
                tqdm.write(f"search failed: saved step {step} to {run}; continue with --resume once it answers")
                raise
            row = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **stats}
            scheduler.step()
            if rank > 0:  # rank 0 evaluates, logs and saves; the next step's sums wait for it
                if stop:
                    break
                continue
            if step == start:
                tqdm.write(time_plan(stats, cfg, start, len(questions)))
            row["peak_mem_gb"] = peak_memory_gb(device)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                predictions = evaluate(model, tokenizer, eval_qs, search, cfg)
                save_predictions(run / "eval" / f"step-{step + 1:06d}.json", {"step": step + 1}, predictions)
                result = summarize(predictions)
                row.update({f"eval_{k}": v for k, v in result.items()})
            with (run / "metrics.jsonl").open("a") as log:
                log.write(json.dumps(row) + "\n")
            with (run / "samples.jsonl").open("a", encoding="utf-8") as log:
                log.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in sample_rows(step + 1, questions, trajectories, rewards, tokenizer, cfg))
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}",
                            searches=f"{row['searches']:.2f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                save(step + 1)
            if stop:
                tqdm.write(f"saved step {step + 1} to {run}; continue with --resume")
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return result


def time_plan(stats: dict, cfg: Config, start: int, questions: int) -> str:
    """What the rest of the run takes, from its first step: every step as long as that one, and each
    evaluation as long as its rollout calls (one per eval_batch_size questions), a call taken to cost
    what one of the step's rollout calls cost -- decoding is bound by the kernels launched a token,
    not by the rows in the batch."""
    calls = -(-questions // cfg.rollout_batch_size)
    evals = sum(1 for s in range(start + 1, cfg.steps + 1) if (cfg.eval_every and s % cfg.eval_every == 0)
                or s == cfg.steps)
    eval_s = -(-cfg.eval_size // cfg.eval_batch_size) * stats["rollout_s"] / calls
    left = (cfg.steps - start - 1) * stats["step_s"] + evals * eval_s
    return (f"time plan: a step takes {stats['step_s'] / 60:.1f} min (rollout {stats['rollout_s']:.0f} s in {calls} "
            f"call{'s' * (calls > 1)} of up to {cfg.rollout_batch_size} questions, log-probs {stats['logprob_s']:.0f} s, "
            f"update {stats['update_s']:.0f} s), an evaluation ~{eval_s / 60:.1f} min: ~{left / 3600:.1f} h more for "
            f"the {cfg.steps - start - 1} steps and {evals} evaluation{'s' * (evals != 1)} left")


def run_tiny(cfg: Config, task=None) -> dict:
    """`--model tiny` or `tiny-multihop`: tiny.py's task end to end -- data, index, warm-up, GRPO or
    PPO through train().

    task: a tiny.TinyTask (size of the task and of its warm-up); None = the one --model names."""
    run = Path(cfg.out_dir or (f"runs/{cfg.model}" + ("-ppo" if cfg.algo == "ppo" else "")
                               + ("" if cfg.mask_observations else "-no-mask")))
    paths_of = ("model", "train_data", "eval_data", "corpus", "index_dir")  # tiny.prepare sets these
    check_run_folder(run, dataclasses.replace(cfg, out_dir=str(run)), derived=paths_of)  # before the warm-up
    task = task or dataclasses.replace(tiny.TASKS[cfg.model], seed=cfg.seed)
    prepare = lambda: tiny.prepare(run / "task", task, cfg.topk)  # noqa: E731
    rank, ranks = world()
    paths = prepare() if rank == 0 else None
    if ranks > 1:  # torchrun: rank 0 made the task and its warm-up; the others find them made
        dist.barrier()
        paths = paths or prepare()
    cfg = dataclasses.replace(cfg, out_dir=str(run), **paths)  # --model is now the warm-up folder
    if rank > 0:
        return {"after": train(cfg)}
    tokenizer, model = load_policy(cfg, pick_device(cfg))      # LoRA starts at B = 0: the warm-up model
    before = summarize(evaluate(model, tokenizer, load_questions(cfg)[1], make_search(cfg), cfg, desc="eval warm-up"))
    after = train(cfg)
    print(tiny.before_after_table(before, after, cfg.algo.upper()))
    print(f"curves: {plot_runs([run], run / 'metrics.png')}")
    return {"before": before, "after": after}


# ----------------------------------------------------------------------------- plots
PANELS = [("reward", "training reward"), ("eval_em", "held-out EM (greedy)"), ("searches", "searches per trajectory"),
          ("response_len", "response tokens"), ("kl", "KL to the reference"), ("clip_frac", "clip fraction"),
          ("entropy", "entropy"), ("value_loss", "value loss (PPO)")]


def plot_runs(runs: list[Path], png: Path) -> Path:
    """One figure of each run's metrics.jsonl against the step, a panel per quantity, runs overlaid."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    logs = {}
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise UsageError(f"{run}: no metrics.jsonl there (is it a run folder?)")
        algo = json.loads((run / "config.json").read_text())["algo"].upper() if (run / "config.json").is_file() else "?"
        logs[f"{run.name} ({algo})"] = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    panels = [(key, title) for key, title in PANELS if any(key in r for rows in logs.values() for r in rows)]
    columns = min(4, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // columns), columns, figsize=(3.6 * columns, 2.8 * -(-len(panels) // columns)),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(logs.items()):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # held-out EM exists only where evaluated: markers, sized so equal values stay visible
                ax.plot(*zip(*points), ("o--" if key == "eval_em" else "-"), color=f"C{i}",
                        markersize=8 - 2 * (i % 3), label=label)
        ax.set(title=title, xlabel="step", **({"ylim": (-0.02, 1.02)} if key in ("reward", "eval_em") else {}))
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# ----------------------------------------------------------------------------- eval, ask, export
def tiny_agent(cfg: Config, adapter: str) -> Config:
    """`--model tiny` (or tiny-multihop) outside training: the base is the run's warm-up model,
    searching the run's own knowledge base, both read from the run's config.json (adapter: a run
    folder or one of its checkpoints)."""
    if cfg.model not in tiny.TASKS:
        return cfg
    folder = Path(adapter)
    run = next((f for f in (folder, folder.parent.parent) if adapter and (f / "config.json").is_file()), None)
    if run is None:
        raise UsageError(f"--model {cfg.model}: give --adapter with the run folder of `python searchr1.py "
                         f"--model {cfg.model}` (e.g. runs/{cfg.model}) or one of its checkpoints")
    saved = json.loads((run / "config.json").read_text())
    return dataclasses.replace(cfg, model=saved["model"], corpus=cfg.corpus or saved["corpus"],
                               index_dir=cfg.index_dir or saved["index_dir"])


def load_agent(cfg: Config, adapter: str, device):
    """load_policy, with a trained adapter put in: a checkpoint folder, or a run folder (its latest)."""
    if not adapter:
        return load_policy(cfg, device)  # a fresh adapter adds exactly 0: the model as it is
    folder, latest = Path(adapter), Path(adapter) / "checkpoints" / "latest.json"
    if latest.is_file():
        folder = latest.parent / json.loads(latest.read_text())["path"]
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json there; give a checkpoint folder "
                         "(<run>/checkpoints/step-N) or a run folder")
    lora = json.loads((folder / "adapter_config.json").read_text())  # the shapes it was trained with
    cfg = dataclasses.replace(cfg, lora_r=lora["r"], lora_alpha=lora["lora_alpha"],
                              lora_targets=lora["target_modules"])
    tokenizer, model = load_policy(cfg, device)
    load_adapter(model, folder)
    return tokenizer, model


def method_prompts(method: str, tokenizer, chat: bool, search):
    """evaluate's prompts for a method: None (Search-R1's prompt) for search-r1, else the baseline's."""
    if method == "search-r1":
        return None
    def prompts(batch):  # RAG: the top-k passages of the question itself, retrieved once
        passages = search([q["question"] for q in batch]) if method == "rag" else [""] * len(batch)
        return [encode_prompt(baseline_prompt(method, q["question"], p), tokenizer, chat)
                for q, p in zip(batch, passages)]
    return prompts


# what makes a saved (method, dataset) result reusable by a resumed `eval`
EVAL_SETTINGS = ("model", "chat", "load_4bit", "corpus", "search_url", "topk", "max_turns", "max_new_tokens",
                 "max_obs_tokens", "seed")


def command_eval(cfg: Config, args) -> None:
    """Every (method, dataset) cell: load saved predictions made with the same settings, or evaluate."""
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: must be at least 0 (0 = every question)")
    cfg = tiny_agent(cfg, args.adapter)
    methods, sources = args.methods.split(","), args.datasets.split(",")
    if unknown := sorted(set(methods) - set(METHODS)):
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    names = [Path(s).stem if s.endswith((".jsonl", ".json")) else s for s in sources]  # table columns
    if len(set(names)) < len(names):
        raise UsageError(f"--datasets: two datasets share a name ({', '.join(names)}); rename a file")
    out = Path(cfg.out_dir or (Path(args.adapter) / "eval" if args.adapter else f"runs/eval/{Path(cfg.model).name}"))
    settings = {key: getattr(cfg, key) for key in EVAL_SETTINGS} | {"adapter": args.adapter, "limit": args.limit}
    cells, todo = {}, []  # (method, dataset name) -> predictions; cells still to evaluate
    for source, name in zip(sources, names):
        questions = load_qa(source)
        if 0 < args.limit < len(questions):
            questions = random.Random(cfg.seed).sample(questions, args.limit)
        for method in methods:
            cell = {**settings, "method": method, "dataset": source}
            cells[method, name] = saved_predictions(out / method / f"{name}.json", cell, questions)
            if cells[method, name] is None:
                todo.append((method, name, questions, cell))
    if todo:  # nothing is loaded when every cell was saved by an earlier run
        tokenizer, model = load_agent(cfg, args.adapter, pick_device(cfg))
        search = make_search(cfg) if any(method != "direct" for method, *_ in todo) else None
    for method, name, questions, cell in todo:
        # the baselines answer in one turn that runs no search: max_turns 0
        run_cfg = cfg if method == "search-r1" else dataclasses.replace(cfg, max_turns=0)
        cells[method, name] = evaluate(model, tokenizer, questions, search, run_cfg, desc=f"{method} {name}",
                                       prompts=method_prompts(method, tokenizer, uses_chat_template(cfg, tokenizer),
                                                              search))
        save_predictions(out / method / f"{name}.json", cell, cells[method, name])
        tqdm.write(f"{method} on {name}: EM {summarize(cells[method, name])['em']:.3f}")
    sizes = ", ".join(f"{name} {len(cells[methods[0], name])}" for name in names)
    table = (em_table({key: summarize(p)["em"] for key, p in cells.items()}, methods, names)
             + f"\nExact match, greedy. Model {cfg.model}{' + adapter ' + args.adapter if args.adapter else ''}; "
               f"questions per dataset: {sizes}.\n")
    write_atomic(out / "results.md", table)
    print(table + f"\nsaved: {out / 'results.md'}, predictions in {out}/<method>/<dataset>.json")


def command_ask(cfg: Config, args) -> None:
    """Greedy Search-R1 rollouts of one question at a time, printed as they are sampled."""
    cfg = tiny_agent(cfg, args.adapter)
    tokenizer, model = load_agent(cfg, args.adapter, pick_device(cfg))
    search, chat = make_search(cfg), uses_chat_template(cfg, tokenizer)

    def search_and_show(queries):
        results = search(queries)
        for passages in results:
            titles = re.findall(r"^Doc \d+\(Title: (.*?)\) ", passages, flags=re.MULTILINE)
            print(f"\n[found: {'; '.join(titles) or 'nothing'}]", flush=True)
        return results

    turn_ids, shown = [], [""]
    def show_token(logits, rows, turn, step):
        """A logits hook that changes nothing: greedy decoding samples this argmax; print it now."""
        if step == 0:
            turn_ids.clear()
            shown[0] = ""
        turn_ids.append(int(logits[0].argmax()))
        text = tokenizer.decode(turn_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # else: wait for the rest of a multi-byte character
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text
        return logits

    def answer(question: str):
        prompt = build_prompt(question, tokenizer, chat)
        (t,) = rollout(model, tokenizer, [prompt], search_and_show, cfg.rollout_config(greedy=True),
                       logits_hook=show_token)
        print(f"\nanswer: {extract_answer(t.text) or '(none)'}  ({t.n_searches} searches)\n", flush=True)

    if args.question:
        return answer(args.question)
    while True:  # one question a line, until an empty line or the end of the input
        try:
            question = input("question> ").strip()
        except EOFError:
            break
        if not question:
            break
        answer(question)


def adapter_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--adapter", default="", help="a LoRA adapter from training: a checkpoint folder "
                        "(<run>/checkpoints/step-N) or a run folder (its latest checkpoint); --model is its "
                        "base (default: none, the model as it is)")


def eval_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("--datasets", default=",".join(BENCHMARKS),
                        help="comma-separated benchmark names (hub, the paper's split) or FlashRAG JSONL files "
                             "(default: the paper's seven)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all three)")
    parser.add_argument("--limit", type=int, default=0,
                        help="questions per dataset, a sample seeded by --seed; 0 = all (default: 0)")


def ask_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("question", nargs="?", default="",
                        help="the question; none = read questions from standard input until an empty line")


# ----------------------------------------------------------------------------- command line
def config_parser(command: str) -> argparse.ArgumentParser:
    """A parser with a --flag for each Config field the command reads (COMMAND_FIELDS), defaults as
    the command sets them (COMMAND_DEFAULTS)."""
    parser = argparse.ArgumentParser(prog=f"searchr1.py {command}", description=COMMANDS[command][2],
                                     epilog=presets_help() if command == "train" else None)
    defaults, fields = COMMAND_DEFAULTS.get(command, {}), COMMAND_FIELDS.get(command)
    for f in dataclasses.fields(Config):
        if fields is not None and f.name not in fields:
            continue
        default = defaults.get(f.name, f.default)
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag(f.name), type=type(f.default), default=default,
                                help=f"{f.metadata['help']} (default: {default})")
    return parser


def command_train(cfg: Config, args) -> dict:
    return run_tiny(cfg) if cfg.model in tiny.TASKS else train(cfg)


def command_serve(cfg: Config, args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be 0 (any free port) to 65535")
    serve(open_index(cfg), args.host, args.port, default_topk=cfg.topk)


def command_plot(cfg: Config, args) -> None:
    png = Path(args.out) if args.out else Path(args.runs[0]) / "metrics.png"
    print(f"wrote {plot_runs([Path(run) for run in args.runs], png)}")


def plot_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl), overlaid in one figure")
    parser.add_argument("--out", default="", help="the PNG to write (default: <first run>/metrics.png)")


def command_export(cfg: Config, args) -> None:
    """The base model with the adapter merged into its weights, saved as a plain Hugging Face model."""
    if not args.adapter or not args.out:
        raise UsageError("export needs --adapter (a run or checkpoint folder) and --out (a new folder)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder is not empty; give a new one")
    # a 16-bit merge needs 16-bit base weights: load them unquantized (on a GPU when --device finds one)
    cfg = dataclasses.replace(tiny_agent(cfg, args.adapter), load_4bit=False, gradient_checkpointing=False)
    tokenizer, model = load_agent(cfg, args.adapter, pick_device(cfg))
    merged = model.merge_and_unload()                   # W <- W + (alpha / r) B A, the adapter gone
    tmp = out.with_name(out.name + ".tmp")              # written whole, then renamed into place
    merged.to(getattr(torch, args.dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: {resolve_model(cfg.model)} with {args.adapter} merged, {args.dtype}; "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")


def export_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("--out", default="", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="the merged weights' type (default: bfloat16)")


def serve_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 = every interface, for trusted networks only: "
                             "there is no authentication (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one (default: 8000)")


# The reference evaluates with 4 search turns (scripts/nq_hotpotqa/evaluate.sh); it trains with 2.
COMMAND_DEFAULTS = {"eval": dict(max_turns=4), "ask": dict(max_turns=4)}
# The Config fields each command reads, and so shows in its --help (train reads them all)
_AGENT = ("model", "chat", "load_4bit", "corpus", "index_dir", "search_url", "topk", "max_turns",
          "max_new_tokens", "max_obs_tokens", "device", "dtype")
COMMAND_FIELDS = {"eval": _AGENT + ("out_dir", "eval_batch_size", "seed"), "ask": _AGENT,
                  "serve": ("corpus", "index_dir", "topk"), "export": ("model", "device"), "plot": ()}
# name -> (function(cfg, args), function adding the command's own arguments or None, description)
COMMANDS = {
    "train": (command_train, None, "Train a Search-R1 agent with GRPO, or PPO with --algo ppo (the default command)."),
    "serve": (command_serve, serve_arguments, "Serve the BM25 index of --corpus over HTTP with Search-R1's "
                                              "retrieval API (POST /retrieve); --topk is the default top-k."),
    "eval": (command_eval, eval_arguments, "Exact match of direct answers, RAG and Search-R1 on QA benchmarks, "
                                           "greedy: the paper's table in --out-dir/results.md, every prediction "
                                           "in --out-dir/<method>/<dataset>.json. A rerun reuses finished cells."),
    "plot": (command_plot, plot_arguments, "Draw runs' metrics.jsonl (reward, held-out EM, searches, lengths, "
                                           "KL, clip fraction, ...) against the step, in one PNG."),
    "export": (command_export, export_arguments, "Merge a trained adapter into its base model and save a plain "
                                                 "Hugging Face model folder (with the tokenizer)."),
    "ask": (command_ask, ask_arguments, "Ask the agent questions; prints its reasoning, searches, the titles "
                                        "found and its answer as they come."),
}


def commands_help() -> str:
    """`searchr1.py --help`: the commands, one line each."""
    lines = ["usage: searchr1.py [COMMAND] [flags]", "", "commands (train when none is given):"]
    lines += [f"  {name:<7} {description.split('. ')[0].rstrip('.')}"
              for name, (_, _, description) in COMMANDS.items()]
    return "\n".join(lines + ["", "searchr1.py COMMAND --help lists the flags of a command, "
                                  "e.g. searchr1.py train --help"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(commands_help())
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    run, add_arguments, _ = COMMANDS[command]
    parser = config_parser(command)
    if add_arguments:
        add_arguments(parser)
    known = parser.parse_known_args(argv)[0]
    if getattr(known, "model", "") in tiny.TASKS:
        parser.set_defaults(**{**TINY, **(TINY_PPO if getattr(known, "algo", "") == "ppo" else {})})
    args = parser.parse_args(argv)
    # a command's own flags, then its defaults, then Config's for the fields it does not read
    defaults = {f.name: f.default for f in dataclasses.fields(Config)} | COMMAND_DEFAULTS.get(command, {})
    cfg = Config(**{name: getattr(args, name, default) for name, default in defaults.items()})
    try:
        cfg.check()
        init_distributed(cfg)
        result = run(cfg, args)
    except NothingToDo as e:
        print(e)
        return 0
    except (UsageError, DataError, CorpusError, OSError) as e:  # OSError: missing files, no network
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = world()[0]
    if dist.is_initialized():
        dist.destroy_process_group()
    if result is not None and rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
