"""searchr1: Search-R1 on one GPU -- the training script.
Read this file first; it wires the chapters.

    retriever.py  BM25 over a Wikipedia-style corpus          (chapter 1: the search engine)
    rollout.py    the policy writes, searches, reads, answers (chapter 2: trajectories)
    grpo.py       group advantages, clipped loss, KL          (chapter 3: the update)
    ppo.py        critic, GAE, value loss (--algo ppo)        (chapter 3b: the paper's other update)
    eval.py       exact match, the reward, QA data            (chapter 4: the reward)
    searchr1.py   Config, train_step, train, the entry point  (this file)

What a first read may skip lives beside them, each file saying what it holds: policy.py (loading the
model, device, dtype, the memory fit), runs.py (the run folder, checkpoints), distributed.py
(torchrun), agent.py (search, evaluation, a trained agent), commands.py (eval, ask, export, plot,
serve), cli.py (the command line), plan.py (the memory plan), tiny.py (the CPU proof).

One training step (`train_step`, below) is the whole algorithm:
    rollout -> reward (EM) -> group advantages -> pi_old, pi_ref log-probs -> clipped loss + KL
            -> AdamW
(--algo ppo: one response per question, and the critic replaces the group as the baseline: ppo.py)

Where this departs from the paper's setup (Jin et al. 2025, arXiv 2503.09516) and why:
- The policy is a 4-bit NF4 base with a LoRA adapter (QLoRA), not full fine-tuning on 8 GPUs:
  it has to fit one 24 GB card. The reference policy is the same base with the adapter switched
  off, so the weights are held once. LoRA wants a larger learning rate than full fine-tuning.
- The batch is smaller (32 questions x 5 responses, not 512 x 5) and the run shorter (50 steps, not
  1,005) to fit a budget of hours on one card (docs/gpu.md).
- The search engine is BM25 (tantivy) in-process, not E5 dense retrieval on a second GPU.
- Each step reseeds the sampler from (seed, step): a resumed run samples what the
  uninterrupted run would have, so no RNG state has to be saved.
"""
import sys


def require_python(version=sys.version_info) -> None:
    """searchr1 runs on Python 3.11 or newer (hashlib.file_digest, among others): say so, not a
    traceback."""
    if version < (3, 11):
        sys.exit("searchr1 needs Python 3.11 or newer; "
                 f"this is Python {'.'.join(map(str, version[:3]))}")


require_python()

import dataclasses  # noqa: E402 (after the version check: what follows may need 3.11)
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import distributed
import grpo
import health
import ppo
import rollout
import runs
import tiny
from agent import evaluate, make_search
from cli import Command, NothingToDo, UsageError, flag, opt
from commands import COMMANDS as AGENT_COMMANDS
from eval import TRAIN_SETS, DataError, load_qa, reward, summarize
from grpo import batch_logprobs, group_advantages, pack
from policy import (MODELS, clock, fit_to_memory, load_policy, peak_memory_gb, pick_device,
                    pick_dtype, resolve_model, sampling_model, uses_chat_template)
from retriever import CorpusError
from rollout import RolloutConfig, build_prompt, pad_id
from search_api import SearchUnavailable

# The presets, the only defaults besides Config's and the commands' own (shown in `train --help`);
# flags given on the command line still win.
# `--model tiny` and `--model tiny-multihop` (tiny.py): a 0.6M-parameter model trained on a CPU in
# minutes. Turns are ~15 tokens, hence the short budget; one passage per fact, ranked first by its
# query, hence top-1. 80 trajectories a step in mini-batches of 8: 10 optimizer steps a batch, as in
# the reference. LoRA lr 3e-4: held-out EM reaches 1.0 by step ~5; 1e-3 (right for 2 optimizer steps
# a batch) drove the KL above 1 and EM fell back to 0.66. The default 2 search turns are the two
# lookups of a multi-hop question. On the CPU even where a GPU is visible: README's numbers were
# made in float32 there, and a 0.6M-parameter model gains nothing from a GPU (--device cuda still
# takes one).
TINY = dict(device="cpu", load_4bit=False, gradient_checkpointing=False, steps=20, batch_size=16,
            mini_batch_size=8, micro_batch_size=40, lr=3e-4, warmup_ratio=0.0, max_new_tokens=32,
            topk=1, eval_every=5, eval_batch_size=200, save_every=20, critic_lr=3e-3)
# --model tiny --algo ppo: n = 1, so 80 questions a step sample the same 80 trajectories as
# GRPO's 16 x 5
TINY_PPO = dict(batch_size=80)


def presets(given) -> dict:
    """The presets that the flags given (an argparse namespace) call for."""
    if getattr(given, "model", "") not in tiny.TASKS:
        return {}
    return {**TINY, **(TINY_PPO if getattr(given, "algo", "") == "ppo" else {})}


def presets_help() -> str:
    settings = lambda preset: ", ".join(f"{flag(k)} {v}" for k, v in preset.items())  # noqa: E731
    return (f"presets: --model tiny (or tiny-multihop) sets {settings(TINY)}; "
            f"with --algo ppo also {settings(TINY_PPO)}")


@dataclass
class Config:
    # --- what to train on
    model: str = opt("qwen2.5-3b", "alias (see MODELS), hub id or local folder")
    train_data: str = opt("", "FlashRAG JSONL of training questions; empty = NQ + HotpotQA train "
                              "from the hub")
    eval_data: str = opt("", "FlashRAG JSONL of held-out questions; empty = eval_size questions "
                             "held out of train_data")
    corpus: str = opt("", "Search-R1 JSONL(.gz) corpus; empty = wiki-18 from the hub (21M "
                          "passages)")
    index_dir: str = opt("", "where the BM25 index lives; empty = a cache folder keyed by the "
                             "corpus path")
    search_url: str = opt("", "a Search-R1 retrieval server (http://host:8000/retrieve) searched "
                              "instead of the corpus, e.g. an E5 dense index; empty = in-process "
                              "BM25")
    out_dir: str = opt("", "run folder (checkpoints, metrics.jsonl); empty = runs/<model>")
    chat: str = opt("auto", "prompt style: 'auto' (the tokenizer's chat template when it has one, "
                            "base models included, as the reference does), 'yes' or 'no' (plain "
                            "text)")
    # --- the policy: QLoRA
    load_4bit: bool = opt(True, "NF4 4-bit base weights (bitsandbytes): 3B fits in ~2 GB instead "
                                "of ~6")
    lora_r: int = opt(16, "LoRA rank: 16 adapts all projections with ~30M parameters on 3B")
    lora_alpha: int = opt(32, "LoRA scale alpha / r = 2, the common choice")
    lora_dropout: float = opt(0.0, "0: dropout would make the trainer's log-probs differ from the "
                                   "sampler's")
    lora_targets: str = opt("all-linear", "modules given adapters: every linear projection, as "
                                          "QLoRA does")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward: ~4x less "
                                             "activation memory")
    # --- GRPO (docs/reference.md)
    steps: int = opt(50, "training steps of a run: 50 x 32 x 5 trajectories, 3-5 hours on a 24 GB "
                         "card by arithmetic (docs/gpu.md); the reference: 1,005")
    batch_size: int = opt(32, "questions per step, sized with --steps for a run of hours "
                              "(reference: 512 on 8 GPUs)")
    group_size: int = opt(5, "responses per question, G in the advantage (paper: 5); PPO samples "
                             "1")
    mini_batch_size: int = opt(16, "trajectories per optimizer step: 32 x 5 / 16 = 10 steps a "
                                   "batch, the reference's 10 (2,560 / 256)")
    rollout_batch_size: int = opt(0, "questions per rollout call, their KV cache held at once; 0 "
                                     "= the largest the memory plan fits on the GPU (16 on the "
                                     "CPU)")
    micro_batch_size: int = opt(0, "trajectories per forward/backward; 0 = the largest the memory "
                                   "plan fits (8 on the CPU)")
    gpu_memory_gb: float = opt(0.0, "GPU memory to plan for (e.g. 16 or 24 to plan for a smaller "
                                    "card); 0 = the visible GPU's")
    lr: float = opt(2e-05, "AdamW learning rate: LoRA needs ~10-20x the paper's full fine-tuning "
                           "1e-6")
    warmup_ratio: float = opt(0.285, "share of steps with linear warm-up (reference: 0.285), then "
                                     "constant")
    weight_decay: float = opt(0.01, "AdamW weight decay (reference: 0.01, torch's AdamW default)")
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm")
    clip_eps: float = opt(0.2, "PPO clip range epsilon")
    kl_coef: float = opt(0.001, "beta, weight of the low-variance KL to the reference policy")
    entropy_coef: float = opt(0.001, "weight of the entropy bonus in the actor loss (reference: "
                                     "0.001)")
    mask_observations: bool = opt(True, "retrieved-token masking; --no-mask-observations is the "
                                        "paper's ablation")
    rollout_weights: str = opt("adapter", "what training's rollout samples from: 'adapter' (the "
                                          "4-bit base and LoRA adapter, as the update computes) "
                                          "or 'merged' (a 16-bit copy of the base with the "
                                          "adapter merged in, made before each rollout and freed "
                                          "after: one matmul a linear; +2 bytes a weight while it "
                                          "lives, so only where the memory plan fits it)")
    old_logprobs: str = opt("recompute", "pi_old: 'recompute' (a forward pass after the rollout, "
                                         "as the reference) or 'rollout' (the sampler's own "
                                         "log-probs: one pass fewer; in 4-bit they may drift from "
                                         "a fresh pass, which bench.py gpu measures)")
    # --- PPO (ppo.py): --algo ppo adds a critic and samples one response per question
    algo: str = opt("grpo", "'grpo' (group baseline) or 'ppo' (critic baseline; one response per "
                            "question, as in the paper)")
    critic_lr: float = opt(0.0002, "critic LoRA + value head learning rate: 10x the actor's, the "
                                   "paper's ratio (1e-5 vs 1e-6)")
    critic_warmup_ratio: float = opt(0.015, "share of steps with linear warm-up of the critic's "
                                            "lr (reference: 0.015)")
    gae_gamma: float = opt(1.0, "GAE discount gamma (paper: 1, the reward comes only at the end)")
    gae_lambda: float = opt(1.0, "GAE lambda (paper: 1: advantage = return - value)")
    value_clip: float = opt(0.5, "how far one update may move a value from the one GAE used "
                                 "(paper: 0.5)")
    # --- rollout (docs/reference.md)
    max_turns: int = opt(2, "search turns before the forced final answer turn (reference: 2 in "
                            "training, 4 in eval and ask)")
    max_new_tokens: int = opt(500, "tokens the policy may sample in one turn")
    max_obs_tokens: int = opt(500, "tokens of an <information> block before it is truncated")
    topk: int = opt(3, "passages per search")
    temperature: float = opt(1.0, "sampling temperature while training (paper: 1.0)")
    top_p: float = opt(0.95, "nucleus sampling while training (reference: 0.95); log-probs use "
                             "the full softmax")
    # --- bookkeeping
    eval_every: int = opt(25, "steps between evaluations on the held-out set (0 = only at the "
                              "end)")
    eval_size: int = opt(200, "held-out questions evaluated, greedy")
    eval_batch_size: int = opt(32, "questions per greedy evaluation rollout")
    save_every: int = opt(10, "steps between checkpoints")
    keep_checkpoints: int = opt(0, "checkpoints kept, the newest, and always the best held-out "
                                   "EM's (best.json); 0 = every one (Qwen2.5-3B: 0.36 GB each)")
    samples: int = opt(4, "trajectories a step written out in full to samples.jsonl (a seeded "
                          "choice), beside those that trip a health check (health.py); 0 = none")
    report_to: str = opt("", "also log each step's numbers to 'tensorboard' (<run>/tensorboard) "
                             "or 'wandb' (<run>/wandb; WANDB_MODE=offline needs no network), or "
                             "'tensorboard,wandb'; each installed only when asked: pip install "
                             "tensorboard / wandb")
    seed: int = opt(0, "seeds data order and sampling")
    device: str = opt("auto", "'auto' (CUDA if present), 'cuda' or 'cpu'")
    dtype: str = opt("auto", "compute dtype: 'auto' (bfloat16 on GPUs that have it, float16 with "
                             "loss scaling on older ones: T4, V100, RTX 20xx; float32 on the "
                             "CPU), 'bfloat16', 'float16' or 'float32'")
    resume: bool = opt(False, "continue out_dir's run from its last checkpoint (the same "
                              "settings; --steps may grow)")
    overwrite: bool = opt(False, "start over in an out_dir that holds a run, deleting its "
                                 "checkpoints, metrics, samples and evaluations")
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
        """Every setting in its range, before any work is done: the first one that is not is a
        UsageError."""
        choices = {"chat": ("auto", "yes", "no"), "algo": ("grpo", "ppo"),
                   "dtype": ("auto", "bfloat16", "float16", "float32"),
                   "old_logprobs": ("recompute", "rollout"),
                   "rollout_weights": ("adapter", "merged")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{flag(name)} {getattr(self, name)!r}: choose one of "
                                 f"{', '.join(allowed)}")
        if unknown := set(filter(None, self.report_to.split(","))) - {"tensorboard", "wandb"}:
            raise UsageError(f"--report-to {self.report_to!r}: {', '.join(sorted(unknown))} is not "
                             "tensorboard or wandb")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UsageError(f"--device {self.device!r}: choose auto, cpu, cuda or cuda:N")
        rules = [  # (fields, test, what the value must be)
            (("steps", "batch_size", "mini_batch_size", "lora_r", "lora_alpha", "max_new_tokens",
              "max_obs_tokens", "topk", "eval_size", "eval_batch_size", "save_every", "group_size"),
             lambda v: v >= 1, "at least 1"),
            (("max_turns", "eval_every", "keep_checkpoints", "samples", "micro_batch_size",
              "rollout_batch_size", "gpu_memory_gb"), lambda v: v >= 0, "at least 0"),
            (("lr", "critic_lr", "temperature", "max_grad_norm", "clip_eps", "value_clip"),
             lambda v: v > 0, "above 0"),
            (("kl_coef", "entropy_coef", "weight_decay"), lambda v: v >= 0, "at least 0"),
            (("warmup_ratio", "critic_warmup_ratio", "gae_gamma", "gae_lambda"),
             lambda v: 0 <= v <= 1, "between 0 and 1"),
            (("top_p",), lambda v: 0 < v <= 1, "above 0 and at most 1"),
            (("lora_dropout",), lambda v: 0 <= v < 1, "at least 0 and below 1"),
        ]
        for fields, ok, must_be in rules:  # `not ok(v)` also catches nan
            for name in fields:
                if not ok(getattr(self, name)):
                    raise UsageError(f"{flag(name)} {getattr(self, name)}: must be {must_be}")
        if self.old_logprobs == "rollout" and not self.mask_observations:
            raise UsageError("--old-logprobs rollout needs retrieved-token masking: retrieved "
                             "tokens were not sampled, so the rollout has no log-probs for them")
        if self.algo == "grpo" and self.group_size < 2:
            raise UsageError(f"--group-size {self.group_size}: GRPO compares at least 2 responses "
                             "per question (or use --algo ppo)")


# ----------------------------------------------------------------------------- the data of a run
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


def batch_at(train: list[dict], step: int, cfg: Config) -> list[dict]:
    """The questions of step `step`: a seeded permutation per epoch, so resuming needs no state."""
    per_epoch = len(train) // cfg.batch_size
    if per_epoch == 0:
        raise UsageError(f"{len(train)} training questions are fewer than "
                         f"--batch-size {cfg.batch_size}")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return [train[j] for j in order[i * cfg.batch_size: (i + 1) * cfg.batch_size].tolist()]


def cut(items: list, size: int) -> list[list]:
    """Consecutive pieces of `size` items (the last may be shorter)."""
    return [items[i: i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- one step
def train_step(model, tokenizer, optimizer, questions, search, cfg: Config, device, scaler=None):
    """One GRPO (or PPO) step: rollout -> reward -> advantages -> pi_old, pi_ref log-probs
    -> update.

    scaler: a torch.amp.GradScaler when the base computes in float16, else None (OptimizerStep).
    Returns (stats for metrics.jsonl, the trajectories (N,) prompt-major, their rewards (N,))."""
    t0 = clock(device)
    # 1. rollout: G responses per question from the current policy (trajectories prompt-major), in
    #    chunks of rollout_batch_size questions, whose KV cache is held at once
    chat = uses_chat_template(cfg, tokenizer)
    prompts = [build_prompt(q["question"], tokenizer, chat) for q in questions]
    # --rollout-weights: the policy, or its merged copy
    with sampling_model(model, cfg, device) as sampler:
        trajectories = [t for chunk in cut(prompts, cfg.rollout_batch_size)
                        for t in rollout.rollout(sampler, tokenizer, chunk, search, cfg.rollout_config())]
    t_rollout = clock(device)
    # 2. reward: eval.reward, the exact match of the trajectory's answer, 1 or 0 (the seam to
    #    change)
    golden = [q["golden_answers"] for q in questions for _ in range(cfg.samples_per_question)]
    rewards = torch.tensor([reward(t.text, g)[0] for t, g in zip(trajectories, golden)])
    # 3. GRPO's advantages: A_i = (r_i - mean_group) / (std_group + 1e-6), one per trajectory (N,);
    #    PPO's come from its critic, per token, once the batches are packed (step 4)
    advantages = group_advantages(rewards, cfg.samples_per_question) if cfg.algo == "grpo" else None
    # 4. mini-batches of mini_batch_size trajectories (one optimizer step each), cut into
    #    micro-batches, each with pi_old (the policy that sampled) and pi_ref (adapter off)
    #    log-probs
    def micro_batch(rows: list[int]) -> grpo.Batch:  # these trajectories as tensors on the device
        picked = None if advantages is None else advantages[rows]
        return pack([trajectories[i] for i in rows], picked, pad_id(tokenizer),
                    cfg.mask_observations, device)
    updates = [[micro_batch(micro) for micro in cut(mini, cfg.micro_batch_size)]
               for mini in cut(list(range(len(trajectories))), cfg.mini_batch_size)]
    drift = reference_logprobs(model, [batch for mini in updates for batch in mini], cfg)
    critic_stats = {}
    if cfg.algo == "ppo":  # values, GAE, whitening: per-token advantages (ppo.PPOBatch)
        updates, critic_stats = ppo.token_advantages(model, updates, rewards, cfg)
    t_logprob = clock(device)
    # 5. update: each mini-batch is one optimizer step, its micro-batches accumulating gradients.
    #    GRPO and PPO differ only in a micro-batch's loss, which each backpropagates by
    #    step.backward
    loss_of = ppo.batch_loss if cfg.algo == "ppo" else grpo.batch_loss
    step = OptimizerStep(optimizer, cfg.max_grad_norm, scaler)
    model.train()
    sums, grad_norms = {}, []
    for mini_batch in updates:
        # the token mean's count: every loss_mask token of the mini-batch, on every rank
        n_tokens = max(distributed.all_sum(sum(b.loss_mask.sum().item() for b in mini_batch)), 1.0)
        for batch in mini_batch:
            for key, value in loss_of(model, batch, n_tokens, cfg, step.backward).items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norms.append(step())
    times = {"rollout_s": t_rollout - t0, "logprob_s": t_logprob - t_rollout,
             "update_s": clock(device) - t_logprob}
    stats = step_means(trajectories, rewards, updates, sums, {**critic_stats, **drift}, grad_norms,
                       times)
    return stats, trajectories, rewards


def reference_logprobs(model, batches: list, cfg: Config) -> dict:
    """Each micro-batch's pi_old and pi_ref log-probs (B, R), no gradient. pi_old: recomputed by the
    trainer's own pass (as the reference), or --old-logprobs rollout: as the sampler recorded them.
    Returns how far the sampler's were from the recomputed (what --old-logprobs rollout would
    change)."""
    drift = []  # |log pi_sampler - log pi_old| of each sampled token
    with torch.no_grad():
        for batch in batches:
            if cfg.old_logprobs == "recompute":
                recomputed = batch_logprobs(model, batch, cfg.temperature)                  # (b, R)
                # loss_mask = the sampled tokens, whose log-probs the sampler kept
                if cfg.mask_observations:
                    drift.append((recomputed - batch.old_logp)[batch.loss_mask.bool()].abs())
                batch.old_logp = recomputed
            with model.disable_adapter():
                batch.ref_logp = batch_logprobs(model, batch, cfg.temperature)
    if not drift:
        return {}
    drift = torch.cat(drift)
    return {"logp_drift": distributed.all_sum(drift.sum().item()) / distributed.all_sum(len(drift)),
            "logp_drift_max": drift.max().item()}


class OptimizerStep:
    """The optimizer step after a mini-batch's backward passes, with everything that is not the
    maths: gradients summed over the ranks (torchrun), the float16 loss scaling (GradScaler: the
    loss scaled up in backward so small gradients survive, unscaled before clipping, an overflowing
    step skipped), then clipping each parameter group on its own (PPO: the actor's, the
    critic's)."""

    def __init__(self, optimizer, max_grad_norm: float, scaler=None):
        self.optimizer, self.max_grad_norm, self.scaler = optimizer, max_grad_norm, scaler

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def __call__(self) -> float:
        """Step and zero the gradients; returns the actor's gradient norm before clipping."""
        groups = self.optimizer.param_groups
        distributed.sum_gradients(p for group in groups for p in group["params"])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norms = [torch.nn.utils.clip_grad_norm_(group["params"], self.max_grad_norm).item()
                 for group in groups]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms[0]


def step_means(trajectories, rewards, updates, sums: dict, extra: dict, grad_norms: list,
               times: dict) -> dict:
    """A step's row of metrics.jsonl: means over its trajectories and over its trained tokens
    (torchrun: every rank's), the loss terms' token means, and seconds by phase (log-probs: pi_old,
    pi_ref and PPO's critic values; the update: optimisation)."""
    n = distributed.all_sum(len(trajectories))
    n_trained = distributed.all_sum(sum(b.loss_mask.sum().item() for mini in updates for b in mini))
    per_trajectory = lambda values: distributed.all_sum(sum(values)) / n  # noqa: E731
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    return {"reward": per_trajectory(rewards.tolist()),
            "searches": per_trajectory(t.n_searches for t in trajectories),
            "turns": per_trajectory(t.n_turns for t in trajectories),
            "answered": per_trajectory(t.answered for t in trajectories),
            "response_len": per_trajectory(len(t.response_ids) for t in trajectories),
            **{key: distributed.all_sum(value) / max(n_trained, 1) for key, value in sums.items()},
            **extra, "grad_norm": sum(grad_norms) / len(grad_norms), **times,
            "step_s": sum(times.values()), "tokens_per_s": sampled / max(times["rollout_s"], 1e-9)}


# ----------------------------------------------------------------------------- the run
def make_scheduler(optimizer, cfg: Config, steps: int):
    """Linear warm-up over a share of the steps, then constant (the reference's 'constant' style):
    the lr of step s is lr x (s + 1) / W for the first W = ratio x steps steps (at least 1). PPO's
    critic, the second parameter group, has its own shorter warm-up (reference: actor 0.285, critic
    0.015)."""
    def warmup(ratio: float):
        warmup_steps = max(1, int(ratio * steps))
        return lambda s: min(1.0, (s + 1) / warmup_steps)
    ratios = [cfg.warmup_ratio, cfg.critic_warmup_ratio][: len(optimizer.param_groups)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [warmup(ratio) for ratio in ratios])


def train(cfg: Config) -> dict:
    """Train; returns the last evaluation. Writes the run folder (runs.py): config.json,
    metrics.jsonl, samples.jsonl, eval/step-N.json (each evaluation's predictions) and
    checkpoints/."""
    device = pick_device(cfg)
    check_trainable(cfg, device)
    rank, ranks = distributed.world()
    master = rank == 0  # the process that writes the files, evaluates and prints (torchrun: rank 0)
    run = Path(cfg.out_dir or f"runs/{Path(cfg.model).name}")
    runs.check_run_folder(run, cfg)  # every rank reads the folder; the master alone writes to it
    train_qs, eval_qs = load_questions(cfg)
    if master:
        runs.start(run, cfg)
        search = make_search(cfg)  # builds the index the first time, once
    distributed.barrier()  # then the other ranks open the index the master built (shared pages)
    search = search if master else make_search(cfg)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: the same on every rank
    tokenizer, model = load_policy(cfg, device)
    cfg, budget = fit_to_memory(cfg, model, tokenizer, train_qs, device)
    optimizer, scheduler, scaler, precision = make_optimizer(model, cfg, device, run)
    if master:
        tqdm.write((budget.table() + "\n" if budget else "") + precision)
    start = runs.load_checkpoint(run, model, optimizer, scheduler, scaler) if cfg.resume else 0
    def save(step: int) -> None:
        runs.save_checkpoint(run, step, model, optimizer, scheduler, cfg.keep_checkpoints, scaler)
    rank_cfg = dataclasses.replace(cfg, mini_batch_size=cfg.mini_batch_size // ranks)  # its share
    # the health checks (health.py), knowing a resumed run's past
    monitor = health.Monitor(runs.rows(run / "metrics.jsonl") if master else [])
    best_em = (runs.best_checkpoint(run) or {"eval_em": -1.0})["eval_em"]
    result = {}
    with runs.stop_on_ctrl_c() as stop, runs.Reporters(run, cfg, start, master) as reporters:
        bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps,
                   disable=not master)
        for step in bar:
            torch.manual_seed(cfg.seed * 1_000_003 + step + 100_003 * rank)  # this step's sampling
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            questions = distributed.rank_share(batch_at(train_qs, step, cfg), cfg.mini_batch_size,
                                               cfg.samples_per_question)
            try:
                stats, trajectories, rewards = train_step(model, tokenizer, optimizer, questions,
                                                          search, rank_cfg, device, scaler)
            # raised in the rollout, before any update: `step` steps are intact
            except SearchUnavailable:
                if master:
                    save(step)
                tqdm.write(f"search failed: saved step {step} to {run}; continue with --resume "
                           "once it answers")
                raise
            row = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **stats}
            scheduler.step()
            if not master:  # the master evaluates, logs and saves; the next step's sums wait for it
                if stop:
                    break
                continue
            if step == start:
                tqdm.write(runs.time_plan(stats, cfg, start, len(questions)))
            row["peak_mem_gb"] = peak_memory_gb(device)
            best = False  # a new best held-out EM: its checkpoint stays (--keep-checkpoints)
            if runs.evaluates(cfg, step + 1):
                predictions = evaluate(model, tokenizer, eval_qs, search, cfg)
                runs.save_predictions(run / "eval" / f"step-{step + 1:06d}.json",
                                      {"step": step + 1}, predictions)
                result = summarize(predictions)
                row.update({f"eval_{k}": v for k, v in result.items()})
                best, best_em = result["em"] > best_em, max(result["em"], best_em)
            record_step(run, row, questions, trajectories, rewards, tokenizer, cfg, monitor,
                        reporters)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}",
                            **monitor.bar(row))
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop or best:
                save(step + 1)
            if best:
                runs.mark_best(run, step + 1, best_em)
            if stop:
                tqdm.write(f"saved step {step + 1} to {run}; continue with --resume")
                break
    return result


def record_step(run: Path, row: dict, questions, trajectories, rewards, tokenizer, cfg: Config,
                monitor: health.Monitor, reporters: runs.Reporters) -> None:
    """The master's record of a step: the health signals of its trajectories into its row, a line
    for each health check it trips (health.py), the row to metrics.jsonl (and --report-to), and the
    seeded and the flagged trajectories to samples.jsonl. Under torchrun, the master's share."""
    group = cfg.samples_per_question
    measured = health.measure(trajectories, group, [q["question"] for q in questions])  # once
    row.update(health.step_signals(trajectories, measured, rewards.tolist(), group))
    if warnings := monitor.check(row, row["step"]):
        row["warnings"] = [w.signal for w in warnings]
        for w in warnings:
            tqdm.write(f"warning at step {row['step']}: {w.message}")
    runs.append(run / "metrics.jsonl", [row])
    reporters.log(row)
    flagged = health.flagged(measured, rewards.tolist(), group)
    samples = runs.sample_rows(row["step"], questions, trajectories, rewards, tokenizer, cfg,
                               flagged)
    runs.append(run / "samples.jsonl", samples)


def check_trainable(cfg: Config, device) -> None:
    """What stops a run before any work: an unknown model alias, a real model with no GPU to train
    it on, or (torchrun) a batch the ranks cannot share out in whole questions."""
    resolve_model(cfg.model)
    if device.type == "cpu" and cfg.model in MODELS and cfg.device == "auto":
        raise UsageError(f"{cfg.model} needs a CUDA GPU and none is visible; try --model tiny "
                         "(a tiny search agent that trains on a CPU in minutes) or --device cpu")
    if problem := distributed.check_split(cfg.batch_size, cfg.mini_batch_size,
                                          cfg.samples_per_question):
        raise UsageError(problem)


def make_optimizer(model, cfg: Config, device, run: Path):
    """AdamW over the trainable parameters (PPO: the actor's and the critic's groups), its schedule,
    the float16 loss scaler (or None), and a line saying which precision the run computes in. The
    warm-up stays where the run set it: --resume with a larger --steps only grows the run."""
    trainable = (ppo.param_groups(model, cfg.lr, cfg.critic_lr) if cfg.algo == "ppo"
                 else [p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = json.loads((run / "config.json").read_text())["steps"] if cfg.resume else cfg.steps
    dtype, why = pick_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    precision = (f"compute dtype: {str(dtype).removeprefix('torch.')} ({why}); LoRA weights and "
                 "AdamW in float32")
    return optimizer, make_scheduler(optimizer, cfg, steps), scaler, precision


def run_tiny(cfg: Config, task=None) -> dict:
    """`--model tiny` or `tiny-multihop`: tiny.py's task end to end -- data, index, warm-up, GRPO or
    PPO through train().

    task: a tiny.TinyTask (size of the task and of its warm-up); None = the one --model names."""
    run = Path(cfg.out_dir or (f"runs/{cfg.model}" + ("-ppo" if cfg.algo == "ppo" else "")
                               + ("" if cfg.mask_observations else "-no-mask")))
    # tiny.prepare sets these
    paths_of = ("model", "train_data", "eval_data", "corpus", "index_dir")
    # before the warm-up
    runs.check_run_folder(run, dataclasses.replace(cfg, out_dir=str(run)), derived=paths_of)
    task = task or dataclasses.replace(tiny.TASKS[cfg.model], seed=cfg.seed)
    master = distributed.world()[0] == 0
    paths = tiny.prepare(run / "task", task, cfg.topk) if master else None
    # torchrun: the master made the task and its warm-up; the others find them made
    distributed.barrier()
    paths = paths or tiny.prepare(run / "task", task, cfg.topk)
    cfg = dataclasses.replace(cfg, out_dir=str(run), **paths)  # --model is now the warm-up folder
    if not master:
        return {"after": train(cfg)}
    # LoRA starts at B = 0: the warm-up model
    tokenizer, model = load_policy(cfg, pick_device(cfg))
    held_out = load_questions(cfg)[1]
    before = summarize(evaluate(model, tokenizer, held_out, make_search(cfg), cfg,
                                desc="eval warm-up"))
    after = train(cfg)
    print(tiny.before_after_table(before, after, cfg.algo.upper()))
    print(f"curves: {runs.plot_runs([run], run / 'metrics.png')}")
    return {"before": before, "after": after}


# ----------------------------------------------------------------------------- the entry point
def command_train(cfg: Config, args) -> dict:
    return run_tiny(cfg) if cfg.model in tiny.TASKS else train(cfg)


COMMANDS = {"train": Command(command_train, "Train a Search-R1 agent with GRPO, or PPO with "
                             "--algo ppo (the default command).", epilog=presets_help()),
            **AGENT_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(cli.commands_help(COMMANDS))
        return 0
    name, cfg, args = cli.parse(argv, COMMANDS, Config, presets)
    try:
        cfg.check()
        distributed.init(pick_device(cfg))
        result = COMMANDS[name].run(cfg, args)
    except NothingToDo as e:
        print(e)
        return 0
    except (UsageError, DataError, CorpusError, OSError) as e:  # OSError: missing files, no network
        print(f"error: {e}", file=sys.stderr)
        return 2
    master = distributed.world()[0] == 0
    distributed.close()
    if result is not None and master:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
