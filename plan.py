"""The GPU budget by arithmetic: how much memory each phase of a training step needs, and the chunk
sizes that fit a card. searchr1.py prints the plan before any work; bench.py gpu prints it beside what
a GPU measures.

A step has three phases, and only one runs at a time, so the peak is the weights plus the largest:

    rollout    the KV cache of one rollout chunk at full length
                   rows x tokens x (2 x layers x kv_heads x head_dim x bytes)      (keys and values)
               + one step's logits and the sampler's copies of them: rows x vocab x 4 bytes x 5
               + the prefill of the longest new piece (prompt or observation) through one layer
    log-probs  pi_old and pi_ref, no gradient: one layer's activations for a micro-batch, plus one
               chunk of 256 positions' logits (grpo.token_logprobs never makes the whole (B, T, V))
    update     the same under autograd with gradient checkpointing: every layer's input kept, one
               layer recomputed with its gradients, one logits chunk with its softmax and gradient

and the LoRA adapter (PPO: two) is held throughout with its gradients and AdamW's two moments, all
float32 (16 bytes a parameter). A 4-bit NF4 weight with double quantisation costs ~4.13 bits;
embeddings and the output layer stay 16-bit. Activations are counted for what dominates (the MLP's
intermediate width and the hidden states), not to the byte: the plan keeps a 20% margin for what it
does not count (the allocator's fragmentation, kernels' workspaces, the CUDA context).

This module is arithmetic over numbers and imports nothing of ours.
"""
from dataclasses import dataclass

GB = 2**30
LOGITS_CHUNK = 256   # positions of logits at a time (grpo.token_logprobs)
MARGIN = 0.8         # the plan fills at most 80% of the card
NF4_BYTES = 4.127 / 8  # 4-bit weights, their absmax in 8 bits per 64, those in fp32 per 256


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


def phase_bytes(shape: Shape, load_4bit: bool, dtype_bytes: int, lora_rank: int, adapters: int,
                rollout_rows: int, micro_batch: int, prompt_tokens: int, response_tokens: int,
                new_tokens: int) -> dict[str, float]:
    """Bytes of each term: weights, adapters (LoRA with gradients and AdamW), rollout, log-probs, update."""
    H, I, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    T = prompt_tokens + response_tokens
    linear = L * sum(n_in * n_out for n_in, n_out in shape.linears())
    embeddings = V * H * (1 if shape.tie_word_embeddings else 2)
    weights = linear * (NF4_BYTES if load_4bit else dtype_bytes) + embeddings * dtype_bytes
    adapters_bytes = adapters * shape.lora_parameters(lora_rank) * 16  # fp32 weight, gradient, 2 AdamW moments
    dequantized = H * I * dtype_bytes if load_4bit else 0  # one 4-bit weight unpacked for its matmul
    layer = lambda rows, tokens: rows * tokens * (2 * I + 4 * H) * dtype_bytes  # noqa: E731 (MLP + hidden)
    rollout = (rollout_rows * T * shape.kv_bytes_per_token(dtype_bytes)
               + rollout_rows * V * 4 * 5 + layer(rollout_rows, new_tokens) + dequantized)
    chunk = micro_batch * min(LOGITS_CHUNK, response_tokens) * V * 4
    logprobs = layer(micro_batch, T) + micro_batch * T * H * dtype_bytes + 2 * chunk + dequantized
    update = (L * micro_batch * T * H * dtype_bytes    # each layer's input, kept for the recomputation
              + 2 * layer(micro_batch, T)              # one layer recomputed, and its gradients
              + 4 * chunk + dequantized)               # logits, softmax (entropy), their gradient
    return {"weights": weights, "adapters": adapters_bytes, "rollout": rollout, "logprobs": logprobs,
            "update": update}


@dataclass
class Plan:
    gpu_gb: float
    rollout_batch_size: int  # questions per rollout chunk
    micro_batch_size: int    # trajectories per forward/backward
    terms: dict              # GB of each term at these sizes
    peak_gb: float
    fits: bool

    def table(self) -> str:
        t = self.terms
        rows = [("weights (base, held once)", t["weights"]), ("LoRA + gradients + AdamW", t["adapters"]),
                (f"rollout: KV cache of {self.rollout_batch_size} questions' rows, logits", t["rollout"]),
                (f"log-probs: micro-batch {self.micro_batch_size}, one logits chunk", t["logprobs"]),
                (f"update: micro-batch {self.micro_batch_size}, checkpointed", t["update"])]
        lines = [f"memory plan for {self.gpu_gb:g} GB (peak = weights + LoRA + the largest phase):"]
        lines += [f"  {name:<58}{gb:6.2f} GB" for name, gb in rows]
        verdict = "fits" if self.fits else f"does NOT fit in {MARGIN:.0%} of the card"
        lines.append(f"  {'peak':<58}{self.peak_gb:6.2f} GB  ({verdict})")
        return "\n".join(lines)


def memory_plan(shape: Shape, gpu_gb: float, *, load_4bit: bool, dtype_bytes: int, lora_rank: int, adapters: int,
                questions: int, samples_per_question: int, mini_batch_size: int, prompt_tokens: int,
                response_tokens: int, new_tokens: int, rollout_batch_size: int = 0,
                micro_batch_size: int = 0) -> Plan:
    """The largest rollout chunk (questions) and micro-batch (trajectories) whose phases fit MARGIN of
    gpu_gb; a size given (not 0) is kept as it is. When even 1 does not fit, `fits` is False."""
    budget = MARGIN * gpu_gb * GB
    def terms(chunk: int, micro: int) -> dict:
        return phase_bytes(shape, load_4bit, dtype_bytes, lora_rank, adapters, chunk * samples_per_question, micro,
                           prompt_tokens, response_tokens, new_tokens)
    def peak(t: dict, phases=("rollout", "logprobs", "update")) -> float:
        return t["weights"] + t["adapters"] + max(t[phase] for phase in phases)
    chunk = rollout_batch_size or max([1] + [q for q in range(1, questions + 1)
                                             if peak(terms(q, 1), ["rollout"]) <= budget])
    micro = micro_batch_size or max([1] + [m for m in range(1, mini_batch_size + 1)
                                           if peak(terms(1, m), ["logprobs", "update"]) <= budget])
    t = terms(chunk, micro)
    return Plan(gpu_gb, chunk, micro, {k: v / GB for k, v in t.items()}, peak(t) / GB, peak(t) <= budget)
