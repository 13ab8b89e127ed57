"""The GPU budget by arithmetic: how much memory each phase of a training step needs, and the chunk
sizes that fit a card. The training script prints the plan before any work; `python bench.py gpu`
prints it beside what a GPU measures (docs/gpu.md).

A step has phases that run one at a time, so the peak is what is held throughout plus the largest:

    rollout     the KV cache of one rollout chunk at full length, held once (rollout.py's buffer)
                    rows x (prompt + response budget) x (2 x layers x kv_heads x head_dim x bytes)
                + one step's logits and the sampler's copies of them: rows x vocab x 4 bytes x 5
                + the prefill of the longest new piece (prompt or observation) through one layer
                + with --rollout-weights merged, the 16-bit copy of every linear weight it samples from
    evaluation  the same for a greedy batch of eval_batch_size questions, sampled from the adapter
    log-probs   pi_old and pi_ref, no gradient: one layer's activations for a micro-batch, plus one
                chunk of 256 positions' logits (grpo.token_logprobs never makes the whole (B, T, V))
    update      the same under autograd with gradient checkpointing: every layer's input kept, one
                layer recomputed with what autograd saves for its backward (`saved_bytes_per_token`,
                measured piece by piece with saved-tensor hooks: a test holds it to the measurement)
                and the gradients flowing through it, one logits chunk with its softmax and gradient

and the LoRA adapter (PPO: two) is held throughout with its gradients and AdamW's two moments, all
float32 (16 bytes a parameter). A 4-bit NF4 weight with double quantisation costs ~4.13 bits;
embeddings and the output layer stay 16-bit. The plan keeps a 20% margin for what it does not count
(the allocator's fragmentation, kernels' workspaces, the CUDA context).

This module is arithmetic over numbers and imports nothing of ours.
"""
from dataclasses import dataclass

GB = 2**30
LOGITS_CHUNK = 256   # positions of logits at a time (grpo.token_logprobs)
MARGIN = 0.8         # the plan fills at most 80% of the card
NF4_BYTES = 4.127 / 8  # 4-bit weights, their absmax in 8 bits per 64, those in fp32 per 256
PHASES = ("rollout", "evaluation", "logprobs", "update")


@dataclass
class Shape:
    """What the arithmetic needs of a model's config (a Hugging Face config has these names)."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True

    @classmethod
    def of(cls, config) -> "Shape":
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        return cls(**{name: get(name) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size")},
                   tie_word_embeddings=bool(get("tie_word_embeddings", True)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's linear projections: q, k, v, o, gate, up, down."""
        H, I, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_key_value_heads
        return [(H, q * self.head_dim), (H, kv * self.head_dim), (H, kv * self.head_dim), (q * self.head_dim, H),
                (H, I), (H, I), (I, H)]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def lora_parameters(self, rank: int) -> int:
        """LoRA on every linear projection: rank x (in + out) each, for every layer."""
        return self.num_hidden_layers * sum(rank * (n_in + n_out) for n_in, n_out in self.linears())

    def saved_bytes_per_token(self, lora_rank: int, dtype_bytes: int) -> int:
        """What autograd keeps for the backward of one decoder layer with LoRA on all seven projections,
        per token, in a 16-bit compute dtype (measured piece by piece on the CPU; a float32 base shares
        some of these tensors, so there it is an upper bound). The 4-bit base weights save nothing."""
        H, I, heads = self.hidden_size, self.intermediate_size, self.num_attention_heads
        q_width, kv_width = heads * self.head_dim, self.num_key_value_heads * self.head_dim
        # each RMSNorm: its input in float32 and 1 / rms
        norms = 2 * (4 * H + 4)
        # peft, each adapted linear: its input cast to float32 (for A's gradient) and A x (for B's)
        lora = sum(4 * n_in + 4 * lora_rank for n_in, _ in self.linears())
        # attention: q, k, v and its output; RoPE's cos and sin; the softmax's logsumexp (float32)
        attention = dtype_bytes * (2 * q_width + 2 * kv_width + 2 * self.head_dim) + 4 * heads
        # the MLP: gate (SiLU's input), SiLU(gate) and up (the inputs of their product)
        mlp = dtype_bytes * 3 * I
        return norms + lora + attention + mlp


def phase_bytes(shape: Shape, load_4bit: bool, dtype_bytes: int, lora_rank: int, adapters: int,
                rollout_rows: int, micro_batch: int, prompt_tokens: int, response_tokens: int,
                new_tokens: int, eval_rows: int = 0, merged_copy: bool = False) -> dict[str, float]:
    """Bytes of each term: weights and adapters (held throughout), kv_cache (the rollout's share), and
    the phases rollout, evaluation, logprobs, update."""
    H, I, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    T = prompt_tokens + response_tokens
    linear = L * sum(n_in * n_out for n_in, n_out in shape.linears())
    embeddings = V * H * (1 if shape.tie_word_embeddings else 2)
    weights = linear * (NF4_BYTES if load_4bit else dtype_bytes) + embeddings * dtype_bytes
    adapters_bytes = adapters * shape.lora_parameters(lora_rank) * 16  # fp32 weight, gradient, 2 AdamW moments
    dequantized = H * I * dtype_bytes if load_4bit else 0  # one 4-bit weight unpacked for its matmul
    layer = lambda rows, tokens: rows * tokens * (2 * I + 4 * H) * dtype_bytes  # noqa: E731 (MLP + hidden)
    kv_cache = lambda rows: rows * T * shape.kv_bytes_per_token(dtype_bytes)  # noqa: E731 (full length)
    def sampling(rows: int, merged: bool) -> float:  # one rollout call of `rows` trajectories
        return (kv_cache(rows) + rows * V * 4 * 5 + layer(rows, new_tokens)
                + (linear * dtype_bytes if merged else dequantized))
    chunk = micro_batch * min(LOGITS_CHUNK, response_tokens) * V * 4
    logprobs = layer(micro_batch, T) + micro_batch * T * H * dtype_bytes + 2 * chunk + dequantized
    update = (L * micro_batch * T * H * dtype_bytes                            # each layer's input, kept
              + micro_batch * T * shape.saved_bytes_per_token(lora_rank, dtype_bytes)  # one layer recomputed
              + layer(micro_batch, T)                                          # and its gradients
              + 4 * chunk + dequantized)               # logits, softmax (entropy), their gradient
    return {"weights": weights, "adapters": adapters_bytes,
            "kv_cache": kv_cache(rollout_rows),
            "rollout": sampling(rollout_rows, merged_copy),  # evaluation samples from the adapter
            "evaluation": sampling(eval_rows, False) if eval_rows else 0.0,
            "logprobs": logprobs, "update": update}


@dataclass
class Plan:
    gpu_gb: float
    rollout_batch_size: int  # questions per rollout chunk
    micro_batch_size: int    # trajectories per forward/backward
    rollout_weights: str     # 'adapter' or 'merged': what the rollout samples from
    terms: dict              # GB of each term at these sizes
    peak_gb: float
    fits: bool
    note: str = ""           # why the plan did not take what was asked, if it did not

    def table(self) -> str:
        t = self.terms
        merged = ", 16-bit merged copy" if self.rollout_weights == "merged" else ""
        rows = [("weights (base, held once)", t["weights"]), ("LoRA + gradients + AdamW", t["adapters"]),
                (f"rollout: {self.rollout_batch_size} questions' rows, logits{merged}", t["rollout"]),
                ("  of which the KV cache, at full length", t["kv_cache"]),
                ("evaluation: a greedy batch's rollout", t["evaluation"]),
                (f"log-probs: micro-batch {self.micro_batch_size}, one logits chunk", t["logprobs"]),
                (f"update: micro-batch {self.micro_batch_size}, checkpointed", t["update"])]
        lines = [f"memory plan for {self.gpu_gb:g} GB (peak = weights + LoRA + the largest phase):"]
        lines += [f"  {name:<58}{gb:6.2f} GB" for name, gb in rows]
        verdict = "fits" if self.fits else f"does NOT fit in {MARGIN:.0%} of the card"
        lines.append(f"  {'peak':<58}{self.peak_gb:6.2f} GB  ({verdict})")
        return "\n".join(lines + ([f"  note: {self.note}"] if self.note else []))


def memory_plan(shape: Shape, gpu_gb: float, *, load_4bit: bool, dtype_bytes: int, lora_rank: int, adapters: int,
                questions: int, samples_per_question: int, mini_batch_size: int, prompt_tokens: int,
                response_tokens: int, new_tokens: int, eval_batch_size: int = 0, rollout_weights: str = "adapter",
                rollout_batch_size: int = 0, micro_batch_size: int = 0) -> Plan:
    """The largest rollout chunk (questions) and micro-batch (trajectories) whose phases fit MARGIN of
    gpu_gb; a size given (not 0) is kept as it is. rollout_weights 'merged' is kept only where its
    copy fits beside a chunk of one question; else the plan samples from the adapter and says why.
    When even 1 does not fit, `fits` is False."""
    budget = MARGIN * gpu_gb * GB
    def terms(chunk: int, micro: int, merged: bool) -> dict:
        return phase_bytes(shape, load_4bit, dtype_bytes, lora_rank, adapters, chunk * samples_per_question, micro,
                           prompt_tokens, response_tokens, new_tokens, eval_batch_size, merged)
    def peak(t: dict, phases=PHASES) -> float:
        return t["weights"] + t["adapters"] + max(t[phase] for phase in phases)
    merged, note = rollout_weights == "merged", ""
    if merged and peak(terms(1, 1, True), ["rollout"]) > budget:
        merged, note = False, "--rollout-weights merged: the 16-bit copy does not fit; sampling from the adapter"
    chunk = rollout_batch_size or max([1] + [q for q in range(1, questions + 1)
                                             if peak(terms(q, 1, merged), ["rollout"]) <= budget])
    micro = micro_batch_size or max([1] + [m for m in range(1, mini_batch_size + 1)
                                           if peak(terms(1, m, merged), ["logprobs", "update"]) <= budget])
    t = terms(chunk, micro, merged)
    return Plan(gpu_gb, chunk, micro, "merged" if merged else "adapter", {k: v / GB for k, v in t.items()},
                peak(t) / GB, peak(t) <= budget, note)
