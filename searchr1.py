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
- The batch is smaller (64 questions x 5 responses, not 512 x 5) to fit the budget of ~3 hours.
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
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eval import (BENCHMARKS, METHODS, TRAIN_SETS, DataError, baseline_prompt, em_table, exact_match,
                  extract_answer, load_qa, prediction, save_predictions, saved_predictions, summarize,
                  write_atomic)
from grpo import group_advantages, grpo_loss, mini_batches, token_logprobs
from ppo import CRITIC, add_critic, param_groups, ppo_update
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
# `--model tiny` (tiny.py): the defaults of a 0.6M-parameter model trained on a CPU in minutes;
# flags given on the command line still win. Turns are ~15 tokens, hence the short budget; one
# passage per fact, ranked first by its query, hence top-1. 80 trajectories a step in mini-batches
# of 8: 10 optimizer steps a batch, as in the reference. LoRA lr 3e-4: held-out EM reaches 1.0 by
# step ~5; 1e-3 (right for 2 optimizer steps a batch) drove the KL above 1 and EM fell back to 0.66.
TINY = dict(load_4bit=False, gradient_checkpointing=False, steps=20, batch_size=16,
            group_size=5, mini_batch_size=8, micro_batch_size=40, lr=3e-4, lora_r=16, lora_alpha=32,
            warmup_ratio=0.0, max_new_tokens=32, topk=1, eval_every=5, eval_size=200,
            eval_batch_size=200, save_every=20, critic_lr=3e-3)
# --model tiny --algo ppo: n = 1, so 80 questions a step sample the same 80 trajectories as GRPO's 16 x 5
TINY_PPO = dict(batch_size=80)


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
    steps: int = opt(60, "optimizer steps of a run: ~60 x 64 x 5 trajectories fit ~3 hours on one GPU")
    batch_size: int = opt(64, "questions per step (paper: 512 on 8 GPUs)")
    group_size: int = opt(5, "responses per question, G in the advantage (paper: 5)")
    mini_batch_size: int = opt(32, "trajectories per optimizer step: 64 x 5 / 32 = 10 steps a batch, the "
                                   "reference's 10 (2,560 / 256)")
    rollout_batch_size: int = opt(16, "questions per rollout call: x group_size x ~2.6k tokens x 36 KB of KV cache (3B)")
    micro_batch_size: int = opt(8, "trajectories per forward/backward; lower it when memory runs out")
    lr: float = opt(2e-5, "AdamW learning rate: LoRA needs ~10-20x the paper's full fine-tuning 1e-6")
    warmup_ratio: float = opt(0.285, "share of steps with linear warm-up (reference: 0.285), then constant")
    weight_decay: float = opt(0.01, "AdamW weight decay (reference: 0.01, torch's AdamW default)")
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm")
    clip_eps: float = opt(0.2, "PPO clip range epsilon")
    kl_coef: float = opt(0.001, "beta, weight of the low-variance KL to the reference policy")
    entropy_coef: float = opt(0.001, "weight of the entropy bonus in the actor loss (reference: 0.001)")
    mask_observations: bool = opt(True, "retrieved-token masking; --no-mask-observations is the paper's ablation")
    # --- PPO (ppo.py): --algo ppo adds a critic and samples one response per question
    algo: str = opt("grpo", "'grpo' (group baseline) or 'ppo' (critic baseline; group_size is then forced to 1, n = 1 as in the paper)")
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
    eval_every: int = opt(20, "steps between evaluations on the held-out set (0 = only at the end)")
    eval_size: int = opt(200, "held-out questions evaluated, greedy")
    eval_batch_size: int = opt(32, "questions per greedy evaluation rollout")
    save_every: int = opt(10, "steps between checkpoints")
    seed: int = opt(0, "seeds data order and sampling")
    device: str = opt("auto", "'auto' (CUDA if present), 'cuda' or 'cpu'")
    resume: bool = opt(False, "continue from out_dir's last checkpoint")

    def rollout_config(self, greedy: bool = False) -> RolloutConfig:
        return RolloutConfig(max_turns=self.max_turns, max_new_tokens=self.max_new_tokens,
                             max_obs_tokens=self.max_obs_tokens, top_p=self.top_p,
                             temperature=0.0 if greedy else self.temperature,
                             n_samples=1 if greedy else self.group_size)

    def __post_init__(self):
        if self.algo == "ppo":  # the critic is the baseline: no group needed (Search-R1's PPO: n = 1)
            self.group_size = 1


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- model and data
def resolve_model(name: str) -> str:
    if name in MODELS or Path(name).exists():
        return MODELS.get(name, name)
    if "/" not in name:
        raise UsageError(f"unknown model {name!r}: use a hub id (org/name), a local folder, "
                         f"or one of {', '.join(MODELS)}")
    return name


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible (check nvidia-smi and the torch build)")
    return torch.device(cfg.device)


def load_policy(cfg: Config, device: torch.device):
    """The tokenizer and the trainable policy: (4-bit) base + LoRA adapter, on `device`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    path = resolve_model(cfg.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.algo == "ppo":  # the critic: a second adapter and a value head on the same base (ppo.py)
        add_critic(model)
    return tokenizer, model


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
def pack(trajectories, pad: int) -> dict:
    """Trajectories -> tensors laid out [left pad | prompt | response | right pad].

    input_ids, attention_mask: (B, P + R); loss_mask, response_mask: (B, R), where
    response_mask = 1 on every real response token (sampled or observation).
    """
    P = max(len(t.prompt_ids) for t in trajectories)
    R = max(len(t.response_ids) for t in trajectories)
    B = len(trajectories)
    input_ids = torch.full((B, P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    loss_mask = torch.zeros(B, R)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, P - p: P + r] = torch.tensor(t.prompt_ids + t.response_ids)
        attention_mask[i, P - p: P + r] = 1
        loss_mask[i, :r] = torch.tensor(t.loss_mask, dtype=torch.float)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "response_mask": attention_mask[:, P:].float(), "response_start": P}


def micro_batch_logprobs(model, mb: dict, device, temperature: float, with_entropy: bool = False):
    return token_logprobs(model, mb["input_ids"].to(device), mb["attention_mask"].to(device),
                          mb["response_start"], temperature, with_entropy=with_entropy)


def cut(items: list, size: int) -> list[list]:
    """Consecutive pieces of `size` items (the last may be shorter)."""
    return [items[i: i + size] for i in range(0, len(items), size)]


def clock(device) -> float:
    """time.time() once the GPU has run the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def train_step(model, tokenizer, optimizer, questions, search, cfg: Config, device) -> dict:
    """One GRPO (or PPO) step: rollout -> reward -> advantages -> reference log-probs -> update."""
    t0 = clock(device)
    # 1. rollout: G responses per question from the current policy (trajectories prompt-major)
    model.eval()
    chat = uses_chat_template(cfg, tokenizer)
    prompts = [build_prompt(q["question"], tokenizer, chat) for q in questions]
    trajectories = [t for chunk in cut(prompts, cfg.rollout_batch_size)   # chunks bound the KV cache
                    for t in rollout(model, tokenizer, chunk, search, cfg.rollout_config())]
    t_rollout = clock(device)
    # 2. reward: r = EM(extracted answer, golden answers), 1 or 0
    golden = [q["golden_answers"] for q in questions for _ in range(cfg.group_size)]
    rewards = torch.tensor([exact_match(extract_answer(t.text), g) for t, g in zip(trajectories, golden)])
    # 3. advantages: A_i = (r_i - mean_group) / (std_group + 1e-6), one scalar per trajectory
    advantages = group_advantages(rewards, cfg.group_size)                       # (N,)
    # 4. mini-batches of cfg.mini_batch_size trajectories (one optimizer step each), cut into
    #    micro-batches, with pi_old (the policy that sampled) and pi_ref (adapter off) log-probs
    updates, pad = [], pad_id(tokenizer)
    with torch.no_grad():
        for mini in cut(list(zip(trajectories, advantages)), cfg.mini_batch_size):
            mini_batch = []
            for chunk in cut(mini, cfg.micro_batch_size):
                mb = pack([t for t, _ in chunk], pad)
                mb["advantages"] = torch.stack([a for _, a in chunk])                  # (b,)
                mb["old_logp"] = micro_batch_logprobs(model, mb, device, cfg.temperature)  # (b, R)
                with model.disable_adapter():
                    mb["ref_logp"] = micro_batch_logprobs(model, mb, device, cfg.temperature)
                # retrieved-token masking: train on sampled tokens only, or (ablation) on all of them
                mb["train_mask"] = (mb["loss_mask"] if cfg.mask_observations else mb["response_mask"]).to(device)
                mini_batch.append(mb)
            updates.append(mini_batch)
    t_logprob = clock(device)
    # 5. update: each mini-batch is one optimizer step; its micro-batches accumulate gradients
    model.train()
    if cfg.algo == "ppo":  # the critic is the baseline: token rewards -> GAE -> actor and critic steps
        sums, grad_norms, batch_stats = ppo_update(model, optimizer, updates, rewards, cfg, device)
    else:
        sums, grad_norms, batch_stats = {"policy_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0}, [], {}
        for mini_batch, n_tokens in mini_batches(updates):
            for mb in mini_batch:
                logp, entropy = micro_batch_logprobs(model, mb, device, cfg.temperature, with_entropy=True)
                loss, stats = grpo_loss(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"].to(device),
                                        mb["train_mask"], n_tokens, cfg.clip_eps, cfg.kl_coef,
                                        entropy, cfg.entropy_coef)
                loss.backward()
                for key in sums:
                    sums[key] += stats[key]
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norms.append(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    t_end = clock(device)
    n_trained = sum(mb["train_mask"].sum().item() for mini_batch in updates for mb in mini_batch)
    sampled = sum(sum(t.loss_mask) for t in trajectories)
    return {"reward": rewards.mean().item(),
            "searches": sum(t.n_searches for t in trajectories) / len(trajectories),
            "turns": sum(t.n_turns for t in trajectories) / len(trajectories),
            "answered": sum(t.answered for t in trajectories) / len(trajectories),
            "response_len": sum(len(t.response_ids) for t in trajectories) / len(trajectories),
            **{key: value / max(n_trained, 1) for key, value in sums.items()}, **batch_stats,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            # seconds by phase: rollout; reward + pi_old and pi_ref log-probs; optimisation
            "rollout_s": t_rollout - t0, "logprob_s": t_logprob - t_rollout, "update_s": t_end - t_logprob,
            "step_s": t_end - t0, "tokens_per_s": sampled / max(t_rollout - t0, 1e-9)}


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
def save_checkpoint(run: Path, step: int, model, optimizer, scheduler):
    """Atomic: write checkpoints/step-N.tmp, rename it, then repoint latest.json (os.replace)."""
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)                       # the LoRA adapter, in peft's format
    if CRITIC in model.peft_config:                  # PPO: the critic adapter went to tmp/critic/; its head
        from safetensors.torch import save_file
        save_file(model.value_head.state_dict(), tmp / "value_head.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest.json", json.dumps({"step": step, "path": final.name}))
    for old in root.glob("step-*"):                  # keep the newest checkpoint only
        if old != final:
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


def load_checkpoint(run: Path, model, optimizer, scheduler) -> int:
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


def make_scheduler(optimizer, cfg: Config):
    """Linear warm-up over a share of the steps, then constant (the reference's 'constant' style): the
    lr of step s is lr x (s + 1) / W for the first W = ratio x steps steps (at least 1). PPO's critic,
    the second parameter group, has its own shorter warm-up (reference: actor 0.285, critic 0.015)."""
    def warmup(ratio: float):
        steps = max(1, int(ratio * cfg.steps))
        return lambda s: min(1.0, (s + 1) / steps)
    ratios = [cfg.warmup_ratio, cfg.critic_warmup_ratio][: len(optimizer.param_groups)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [warmup(ratio) for ratio in ratios])


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def train(cfg: Config) -> dict:
    """Train; returns the last evaluation. Writes out_dir/metrics.jsonl and checkpoints."""
    resolve_model(cfg.model)  # an unknown alias fails now, not after the data has loaded
    if cfg.algo not in ("grpo", "ppo"):
        raise UsageError(f"--algo {cfg.algo!r}: use 'grpo' or 'ppo'")
    device = pick_device(cfg)
    if device.type == "cpu" and cfg.model in MODELS and cfg.device == "auto":
        raise UsageError(f"{cfg.model} needs a CUDA GPU and none is visible; try --model tiny "
                         "(a tiny search agent that trains on a CPU in minutes) or --device cpu")
    run = Path(cfg.out_dir or f"runs/{Path(cfg.model).name}")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    train_qs, eval_qs = load_questions(cfg)
    search = make_search(cfg)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: same seed, same run
    tokenizer, model = load_policy(cfg, device)
    trainable = (param_groups(model, cfg.lr, cfg.critic_lr) if cfg.algo == "ppo"  # actor, critic
                 else [p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    start = load_checkpoint(run, model, optimizer, scheduler) if cfg.resume else 0
    log_path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in log_path.open()] if cfg.resume and log_path.exists() else []
    with log_path.open("w") as log:  # a resumed run forgets rows logged after its checkpoint
        log.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)

    stop = []  # Ctrl-C once: finish this step, save, exit; twice: exit now
    def on_interrupt(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        tqdm.write("interrupted: saving after this step (Ctrl-C again to quit without saving)")
    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    result = {}
    try:
        bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps)
        for step in bar:
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # sampling of this step, reproducible
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row = {"step": step + 1, "lr": scheduler.get_last_lr()[0],
                       **train_step(model, tokenizer, optimizer, batch_at(train_qs, step, cfg), search, cfg, device)}
            except SearchUnavailable:  # raised in the rollout, before any update: `step` steps are intact
                save_checkpoint(run, step, model, optimizer, scheduler)
                tqdm.write(f"search failed: saved step {step} to {run}; continue with --resume once it answers")
                raise
            scheduler.step()
            row["peak_mem_gb"] = peak_memory_gb(device)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                result = summarize(evaluate(model, tokenizer, eval_qs, search, cfg))
                row.update({f"eval_{k}": v for k, v in result.items()})
            with log_path.open("a") as log:
                log.write(json.dumps(row) + "\n")
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}",
                            searches=f"{row['searches']:.2f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                save_checkpoint(run, step + 1, model, optimizer, scheduler)
            if stop:
                tqdm.write(f"saved step {step + 1} to {run}; continue with --resume")
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return result


def run_tiny(cfg: Config, task=None) -> dict:
    """`--model tiny`: tiny.py's task end to end -- data, index, warm-up, GRPO or PPO through train().

    task: a tiny.TinyTask (size of the task and of its warm-up); None = the default one."""
    import tiny
    run = Path(cfg.out_dir or ("runs/tiny" + ("-ppo" if cfg.algo == "ppo" else "")
                               + ("" if cfg.mask_observations else "-no-mask")))
    paths = tiny.prepare(run / "task", task or tiny.TinyTask(seed=cfg.seed), cfg.topk)
    cfg = dataclasses.replace(cfg, out_dir=str(run), **paths)  # --model is now the warm-up folder
    tokenizer, model = load_policy(cfg, pick_device(cfg))      # LoRA starts at B = 0: the warm-up model
    before = summarize(evaluate(model, tokenizer, load_questions(cfg)[1], make_search(cfg), cfg, desc="eval warm-up"))
    after = train(cfg)
    print(tiny.before_after_table(before, after, cfg.algo.upper()))
    print(tiny.save_reward_curve({cfg.algo.upper(): run / "metrics.jsonl"}, run / "reward_curve.png"))
    return {"before": before, "after": after}


# ----------------------------------------------------------------------------- eval and ask
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
    """A parser with one --flag per Config field, defaults as the command sets them (COMMAND_DEFAULTS)."""
    parser = argparse.ArgumentParser(prog=f"searchr1.py {command}", description=COMMANDS[command][2])
    defaults = COMMAND_DEFAULTS.get(command, {})
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=default,
                                help=f"{f.metadata['help']} (default: {default})")
    return parser


def command_train(cfg: Config, args) -> dict:
    return run_tiny(cfg) if cfg.model == "tiny" else train(cfg)


def command_serve(cfg: Config, args) -> None:
    serve(open_index(cfg), args.host, args.port, default_topk=cfg.topk)


def serve_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 = every interface, for trusted networks only: "
                             "there is no authentication (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one (default: 8000)")


# The reference evaluates with 4 search turns (scripts/nq_hotpotqa/evaluate.sh); it trains with 2.
COMMAND_DEFAULTS = {"eval": dict(max_turns=4), "ask": dict(max_turns=4)}
# name -> (function(cfg, args), function adding the command's own arguments or None, description)
COMMANDS = {
    "train": (command_train, None, "Train a Search-R1 agent with GRPO, or PPO with --algo ppo (the default command)."),
    "serve": (command_serve, serve_arguments, "Serve the BM25 index of --corpus over HTTP with Search-R1's "
                                              "retrieval API (POST /retrieve); --topk is the default top-k."),
    "eval": (command_eval, eval_arguments, "Exact match of direct answers, RAG and Search-R1 on QA benchmarks, "
                                           "greedy: the paper's table in --out-dir/results.md, every prediction "
                                           "in --out-dir/<method>/<dataset>.json. A rerun reuses finished cells."),
    "ask": (command_ask, ask_arguments, "Ask the agent questions; prints its reasoning, searches, the titles "
                                        "found and its answer as they come."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    run, add_arguments, _ = COMMANDS[command]
    parser = config_parser(command)
    if add_arguments:
        add_arguments(parser)
    known = parser.parse_known_args(argv)[0]
    if known.model == "tiny":
        parser.set_defaults(**{**TINY, **(TINY_PPO if known.algo == "ppo" else {})})
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    try:
        result = run(cfg, args)
    except (UsageError, DataError, CorpusError, OSError) as e:  # OSError: missing files, no network
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
