"""Chapter 3: the GRPO loss, written from scratch, with retrieved-token masking.

Group Relative Policy Optimization (Shao et al. 2024) is PPO without a critic: for each question
the policy writes a group of G responses, and each response's advantage is its reward measured
against the group's own mean and spread. Search-R1 (Jin et al. 2025, arXiv 2503.09516) adds one
thing: the tokens the search engine inserted (<information> blocks) sit in the context but are
not the policy's actions, so `loss_mask` (1 = a token the policy sampled) keeps them out of every
term of the loss.

    A_i      = (r_i - mean(r)) / (std(r) + 1e-6)                           per group, unbiased std
    ratio_t  = exp(logp_t - logp_old_t)                                    per sampled token
    L_clip_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps))        PPO's pessimistic bound
    KL_t     = exp(d_t) - d_t - 1,  d_t = logp_ref_t - logp_t             "k3" / low_var_kl, >= 0
    H_t      = -sum_v pi(v) log pi(v)                                     entropy of the next-token
                                                                          softmax
    loss     = sum_t loss_mask_t (L_clip_t + beta KL_t - c_H H_t) / sum_t loss_mask_t   token mean

beta = 0.001 and c_H = 0.001, as in the reference's GRPO script (c_H is veRL's default
entropy_coeff).

Where this departs from Search-R1's released script (veRL):
- The token mean is taken over the whole mini-batch, not per micro-batch and then averaged, so
  the gradient does not depend on how the mini-batch is cut into micro-batches.
- Log-probs are computed from the response positions' hidden states a chunk of positions at
  a time, with the logits recomputed in backward, so the (B, T, V) logits tensor never exists.
This module is tensor maths over a model's outputs and imports nothing of ours.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class Batch:
    """A micro-batch of trajectories as tensors, every row laid out
    [left pad | prompt | response | right pad].

    input_ids, attention_mask (B, P + R): the tokens; attention_mask 1 = a real token, 0 = padding.
    response_start: P, the column where every response starts.
    loss_mask (B, R): 1 = a token the loss is taken over -- one the policy sampled; with
        retrieved-token masking off (the paper's ablation), every real response token, retrieved
        ones included.
    old_logp (B, R): log pi_old of each response token, as the sampler recorded it (0 at
        observations), recomputed by the trainer's own pass before the update unless
        --old-logprobs rollout.
    ref_logp (B, R): log pi_ref, the base with the adapter off; filled before the update.
    advantages (B, R): A_t of each response token -- GRPO's A_i on every token of trajectory i, or
        PPO's per-token GAE (ppo.PPOBatch); None until the algorithm has them.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    loss_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


def pack(trajectories, advantages: torch.Tensor | None, pad: int, mask_observations: bool,
         device) -> Batch:
    """Trajectories (rollout.Trajectory) -> a Batch on `device`, their advantages (B,) on every
    token.

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
        loss_mask[i, :r] = torch.tensor(t.loss_mask if mask_observations else [1] * r,
                                        dtype=torch.float)
        sampled_logp[i, :r] = torch.tensor(t.logprobs)  # what the sampler saw; 0.0 at observations
    per_token = None if advantages is None else advantages.float()[:, None].expand(B, R).to(device)
    return Batch(input_ids.to(device), attention_mask.to(device), P, loss_mask.to(device),
                 old_logp=sampled_logp.to(device), advantages=per_token)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-response advantage, (N,) -> (N,), responses of one question adjacent (prompt-major)."""
    groups = rewards.float().view(-1, group_size)                  # (N / G, G)
    if group_size == 1:  # a group of one has no spread: mean 0, std 1, as in the reference
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean = groups.mean(dim=1, keepdim=True)
        std = groups.std(dim=1, keepdim=True)                      # unbiased (divides by G - 1)
    # A_i = (r_i - mean) / (std + eps): an all-equal group gets 0, whatever its reward
    return ((groups - mean) / (std + 1e-6)).view(-1)


def causal_lm(model):
    """The transformers model itself, under peft's wrapper if there is one (LoRA layers stay in
    it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_states(model, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """The last hidden state at each position that predicts a response token: (B, T) -> (B, R, H).

    Rows are laid out [left padding | prompt | response | right padding], so every response
    starts at column `response_start`; position response_start - 1 + t predicts response token t.
    """
    # left padding -> 0, 0, 0, 1, 2
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = causal_lm(model).get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden[:, response_start - 1: -1]                        # (B, R, H)


def _chunk_logprobs(hidden, targets, lm_head, temperature: float, with_entropy: bool):
    logits = lm_head(hidden).float() / temperature                  # (B, c, V)
    log_z = torch.logsumexp(logits, dim=-1)                         # (B, c)
    # log softmax at the taken token only: logit - logsumexp(logits)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    if not with_entropy:
        return logp
    # H = -sum_v p_v log p_v = log Z - sum_v p_v z_v   (z = logits / T, p = softmax(z))
    return logp, log_z - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def token_logprobs(model, input_ids, attention_mask, response_start: int,
                   temperature: float = 1.0, chunk: int = 256, with_entropy: bool = False):
    """log pi(token_t | tokens_<t) for the response tokens: (B, T) -> (B, T - response_start);
    with_entropy: also the entropy of each of those next-token distributions, (logp, entropy).

    Full-vocabulary logits are the largest tensor of training (Qwen2.5: 151,936 floats a token,
    10 GB for 8 responses of 2,300 tokens), so they are made `chunk` positions at a time and,
    under autograd, recomputed in backward (checkpoint) instead of kept: only the prompt's
    hidden states and one chunk of logits ever exist.
    """
    hidden = response_states(model, input_ids, attention_mask, response_start)   # (B, R, H)
    targets = input_ids[:, response_start:]                                       # (B, R)
    lm_head = causal_lm(model).get_output_embeddings()
    args = temperature, with_entropy
    pieces = [checkpoint(_chunk_logprobs, h, y, lm_head, *args, use_reentrant=False)
              if torch.is_grad_enabled() else _chunk_logprobs(h, y, lm_head, *args)
              for h, y in zip(hidden.split(chunk, dim=1), targets.split(chunk, dim=1))]
    if not with_entropy:
        return torch.cat(pieces, dim=1)                                           # (B, R)
    logps, entropies = zip(*pieces)
    return torch.cat(logps, dim=1), torch.cat(entropies, dim=1)                   # (B, R), (B, R)


def clipped_policy_loss(logp, old_logp, advantages, clip_eps: float = 0.2):
    """PPO's clipped surrogate per token, and whether the clip was the active branch.

    logp, old_logp, advantages: (B, R).
    """
    ratio = torch.exp(logp - old_logp)                             # pi_theta / pi_old
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    # L_clip = max(-A ratio, -A clip(ratio)): a step that already moved far in A's direction
    # gets no further push; one that moved against A is never cut short
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def low_var_kl(logp, ref_logp):
    """KL(pi_theta || pi_ref) estimated per token by k3 = exp(d) - d - 1, d = logp_ref - logp."""
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)


def masked_sum(x, mask):
    # where(), not x * mask: a masked position holding inf or nan must contribute exactly 0
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def grpo_loss(logp, old_logp, ref_logp, advantages, loss_mask, n_tokens: int | float,
              clip_eps: float = 0.2, kl_coef: float = 0.001, entropy=None,
              entropy_coef: float = 0.001):
    """The GRPO objective of one micro-batch, as its share of a token mean over `n_tokens`.

    logp, old_logp, ref_logp, advantages, loss_mask, entropy: (B, R) (advantages: A_i on every
    token).
    entropy None: no entropy bonus (and none in the stats).
    n_tokens is the number of loss_mask tokens in the whole mini-batch, so summing this loss
    over the micro-batches gives the mini-batch's token mean (gradient accumulation).
    Returns (loss, stats) with stats as sums over the micro-batch's masked tokens.
    """
    # at positions outside the mask the old and reference log-probs are replaced by the current
    # ones (ratio 1, d = 0): whatever they hold (padding, observation tokens) reaches neither
    # the loss nor, through a 0 * inf, the gradient
    in_loss = loss_mask.bool()
    old_logp = torch.where(in_loss, old_logp, logp.detach())
    ref_logp = torch.where(in_loss, ref_logp, logp.detach())
    policy_loss, clipped = clipped_policy_loss(logp, old_logp, advantages, clip_eps)
    kl = low_var_kl(logp, ref_logp)
    # loss = sum_t mask_t (L_clip_t + beta KL_t) / n_tokens
    loss = (masked_sum(policy_loss, loss_mask) + kl_coef * masked_sum(kl, loss_mask)) / n_tokens
    stats = {"policy_loss": masked_sum(policy_loss, loss_mask).item(),
             "kl": masked_sum(kl, loss_mask).item(),
             "clip_frac": masked_sum(clipped, loss_mask).item()}
    if entropy is not None:
        loss, stats["entropy"] = entropy_bonus(loss, entropy, loss_mask, n_tokens, entropy_coef)
    return loss, stats


def entropy_bonus(loss, entropy, loss_mask, n_tokens, entropy_coef: float):
    """loss - c_H sum_t mask_t H_t / n_tokens: rewards keeping the policy's distribution spread.

    Returns the new loss and the entropy's sum over masked tokens (for the logs)."""
    entropy_sum = masked_sum(entropy, loss_mask)
    return loss - entropy_coef * entropy_sum / n_tokens, entropy_sum.item()


def batch_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """token_logprobs of a Batch's response tokens: (B, R), or ((B, R), (B, R)) with their
    entropies."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start,
                          temperature, with_entropy=with_entropy)


def batch_loss(model, batch: Batch, n_tokens: float, cfg, backward) -> dict:
    """GRPO's loss of one micro-batch, its share of the mini-batch's token mean, backpropagated by
    `backward`; returns its stats' sums. (ppo.batch_loss keeps the same contract: a new loss term
    goes into grpo_loss, or beside it here, and train_step does not change.)"""
    # (b, R), with grad
    logp, entropy = batch_logprobs(model, batch, cfg.temperature, with_entropy=True)
    loss, stats = grpo_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages,
                            batch.loss_mask, n_tokens,
                            cfg.clip_eps, cfg.kl_coef, entropy, cfg.entropy_coef)
    backward(loss)
    return stats
