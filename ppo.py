"""Chapter 3b: PPO with a critic, Search-R1's other algorithm, on the same 4-bit base.

GRPO (grpo.py) measures each response against its group; PPO instead learns a critic V(s_t) that
predicts, at every token, the reward still to come, and measures each token against it. Search-R1
runs PPO with one response per question (n = 1) and puts the KL to the reference into the reward:

    r_t      = -beta (log pi_old(a_t) - log pi_ref(a_t))    on sampled tokens
               + R_outcome                                   added on the last sampled token
    delta_t  = r_t + gamma V(s_t+1) - V(s_t)                 TD error (t+1 = next trained token)
    A_t      = delta_t + gamma lambda A_t+1                  GAE; gamma = lambda = 1:
                                                             A_t = G_t - V(s_t)
    G_t      = A_t + V(s_t)                                  the critic's target (returns)
    A_t      <- (A_t - mean(A)) / sqrt(var(A) + 1e-8)        whitened over trained tokens only
    L_actor  = token mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
               - c_H H                                       grpo.py's terms
    L_critic = token mean of 1/2 max((V - G)^2, (V_clip - G)^2),
               V_clip = V_old + clip(V - V_old, +-c)

Retrieved-token masking: tokens the search engine inserted carry no reward, and GAE skips them:
the value of the last sampled token before an <information> block bootstraps from the value of
the first sampled token after it, as if the block were part of the environment's transition
(which it is). They are kept out of the whitening statistics and both losses. The ablation
(--no-mask-observations) makes every real response token count (the batch's loss_mask).

The critic is a second LoRA adapter ("critic") on the policy's own 4-bit base plus a value head,
nn.Linear(hidden, 1), on the last hidden state; the base weights are held once. peft runs one
adapter at a time (`set_adapter`), so the critic and the actor each take their own forward pass.

Where this departs from Search-R1's released PPO (veRL):
- The critic shares the policy's frozen base and differs only by its LoRA adapter and head; veRL
  trains a full separate copy of the model (a second 3B model does not fit next to a QLoRA actor
  on one card).
- Actor and critic losses are separate functions, each backpropagated right after its own forward
  pass: with gradient checkpointing, backward re-runs each layer, and it must re-run it under the
  adapter that made the forward pass, so the active adapter may not change in between.
- Advantages are whitened over the whole batch in one pass (veRL: the same), and the token means
  run over the mini-batch, not per micro-batch (as in grpo.py).
- `kl` in the logs is the k3 estimate of KL(pi_old || pi_ref), comparable with GRPO's; the reward's
  penalty uses the plain log-ratio, as veRL's default `kl` estimator does.
This module is tensor maths over a model's outputs; it imports only grpo.py of ours.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo import (Batch, batch_logprobs, clipped_policy_loss, entropy_bonus, low_var_kl, masked_sum,
                  response_states)

# peft adapter names: the policy's (peft's default) and the critic's
ACTOR, CRITIC = "default", "critic"


@dataclass
class PPOBatch(Batch):
    """A grpo.Batch with what the critic adds before the update (token_advantages), all (B, R):
    advantages the whitened GAE A_t, values V_old(s_t) and returns G_t, the critic's target."""
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def add_critic(model) -> None:
    """A critic on the policy's base: a second LoRA adapter (same rank and targets) and a value
    head."""
    model.add_adapter(CRITIC, model.peft_config[ACTOR])
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.value_head = torch.nn.Linear(model.config.hidden_size, 1).to(device)  # float32, (H,) -> 1
    model.set_adapter(ACTOR)  # the rollout and the reference (adapters off) see the policy


def param_groups(model, actor_lr: float, critic_lr: float) -> list[dict]:
    """AdamW groups: [actor LoRA at actor_lr, critic LoRA + value head at critic_lr]."""
    actor = [p for n, p in model.named_parameters() if "lora_" in n and f".{ACTOR}." in n]
    critic = [p for n, p in model.named_parameters()
              if ("lora_" in n and f".{CRITIC}." in n) or n.startswith("value_head.")]
    for p in actor + critic:
        p.requires_grad_(True)
    return [{"params": actor, "lr": actor_lr}, {"params": critic, "lr": critic_lr}]


def token_values(model, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """V(s_t) for each response token t, from the hidden state that predicts it: (B, T) -> (B, R).

    Call it with the critic adapter active. Position response_start - 1 + t holds the state in
    which token t is chosen, the same alignment as the log-probs of grpo.token_logprobs.
    """
    hidden = response_states(model, input_ids, attention_mask, response_start)    # (B, R, H)
    return model.value_head(hidden.float()).squeeze(-1)                           # (B, R)


def token_rewards(outcome, old_logp, ref_logp, mask, kl_coef: float = 0.001):
    """r_t: -beta (log pi_old - log pi_ref) on masked tokens, plus the outcome on the last one.

    outcome: (B,); old_logp, ref_logp, mask: (B, R). Rows without a masked token get nothing.
    """
    in_loss = mask.bool()
    rewards = torch.where(in_loss, -kl_coef * (old_logp - ref_logp), torch.zeros_like(old_logp))
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    # (B,) index of the last masked token
    last = (in_loss * positions).argmax(dim=1)
    rewards[torch.arange(len(outcome)), last] += outcome.float() * in_loss.any(dim=1)
    return rewards                                                 # (B, R)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation (Schulman et al. 2016) over masked tokens: (advantages,
    returns).

    rewards, values, mask: (B, R). Unmasked positions are skipped: they neither add reward nor
    end the recursion, and get advantage 0 and return V. After the last masked token V = 0.
    """
    in_loss = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])                    # (B,) V(s_t+1)
    next_advantage = torch.zeros_like(values[:, 0])                # (B,) A_t+1
    for t in reversed(range(values.shape[1])):
        # delta_t = r_t + gamma V(s_t+1) - V(s_t);  A_t = delta_t + gamma lambda A_t+1
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = in_loss[:, t]
        advantages[:, t] = torch.where(here, advantage, torch.zeros_like(advantage))
        next_value = torch.where(here, values[:, t], next_value)   # skipped tokens pass V through
        next_advantage = torch.where(here, advantage, next_advantage)
    return advantages, advantages + values                         # G_t = A_t + V(s_t)


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) var over masked positions only."""
    in_loss = mask.bool()
    mean = x[in_loss].mean()
    var = x[in_loss].var() if in_loss.sum() > 1 else torch.zeros_like(mean)
    return torch.where(in_loss, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def actor_loss(logp, old_logp, advantages, mask, n_tokens, clip_eps: float = 0.2, entropy=None,
               entropy_coef: float = 0.001):
    """The clipped surrogate with per-token advantages, minus the entropy bonus, as its share of a
    token mean over n_tokens.

    logp, old_logp, advantages, mask, entropy: (B, R). No KL term: PPO has it in the reward.
    """
    old_logp = torch.where(mask.bool(), old_logp, logp.detach())   # outside the mask: ratio 1
    policy_loss, clipped = clipped_policy_loss(logp, old_logp, advantages, clip_eps)
    loss = masked_sum(policy_loss, mask) / n_tokens
    stats = {"policy_loss": masked_sum(policy_loss, mask).item(),
             "clip_frac": masked_sum(clipped, mask).item()}
    if entropy is not None:
        loss, stats["entropy"] = entropy_bonus(loss, entropy, mask, n_tokens, entropy_coef)
    return loss, stats


def critic_loss(values, old_values, returns, mask, n_tokens, value_clip: float = 0.5):
    """1/2 max((V - G)^2, (V_clip - G)^2) per token, as its share of a token mean over n_tokens.

    values (with grad), old_values, returns, mask: (B, R). V_clip keeps the new value within
    value_clip of the one GAE used, so one update cannot move the baseline far (PPO's value clip).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_error, clipped_error)
    return masked_sum(loss, mask) / n_tokens, {
        "value_loss": masked_sum(loss, mask).item(),
        "value_clip_frac": masked_sum((clipped_error > unclipped_error).float(), mask).item()}


def explained_variance(values, returns, mask) -> float:
    """1 - Var(G - V) / Var(G) over masked tokens: 1 = perfect critic, 0 = no better than a
    constant."""
    in_loss = mask.bool()
    var_returns = returns[in_loss].var()
    return ((1 - (returns - values)[in_loss].var() / var_returns).item() if var_returns > 0
            else float("nan"))


def token_advantages(model, updates: list[list[Batch]], rewards,
                     cfg) -> tuple[list[list[PPOBatch]], dict]:
    """PPO's baseline, before the update: critic values -> token rewards -> GAE -> whitening.

    updates: the step's mini-batches, each a list of micro-batches (grpo.Batch with old_logp and
    ref_logp) in trajectory order; rewards (N,): their outcomes. Returns the same micro-batches as
    PPOBatch, with their per-token advantages, values and returns, and the batch-wide stats
    (explained variance, KL).
    """
    batches = [batch for mini_batch in updates for batch in mini_batch]
    model.set_adapter(CRITIC)
    with torch.no_grad():
        # V_old(s_t), (b, R)
        values_of = [token_values(model, b.input_ids, b.attention_mask, b.response_start)
                     for b in batches]
        # GAE over the whole batch: micro-batches right-padded to one width R, then stacked
        R = max(b.loss_mask.shape[1] for b in batches)
        stack = lambda tensors: torch.cat([F.pad(t, (0, R - t.shape[1]))  # noqa: E731
                                           for t in tensors])
        # (N, R)
        mask, values = stack([b.loss_mask for b in batches]), stack(values_of)
        old_logp, ref_logp = (stack([b.old_logp for b in batches]),
                              stack([b.ref_logp for b in batches]))
        token_r = token_rewards(rewards.to(mask.device), old_logp, ref_logp, mask, cfg.kl_coef)
        advantages, returns = gae(token_r, values, mask, cfg.gae_gamma, cfg.gae_lambda)
        # over the whole batch
        advantages = whiten(advantages, mask)
        kl = low_var_kl(old_logp, ref_logp)
    model.set_adapter(ACTOR)
    ppo_batches, row = [], 0
    for batch, batch_values in zip(batches, values_of):
        b, r = batch.loss_mask.shape
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}
        ppo_batches.append(PPOBatch(**{**fields, "advantages": advantages[row: row + b, :r]},
                                    values=batch_values, returns=returns[row: row + b, :r]))
        row += b
    pieces = iter(ppo_batches)
    # explained variance of the critic that GAE used (before this step's update), as cleanrl logs it
    return [[next(pieces) for _ in mini_batch] for mini_batch in updates], {
        "explained_variance": explained_variance(values, returns, mask),
        "kl": masked_sum(kl, mask).item() / max(mask.sum().item(), 1)}


def batch_loss(model, batch: PPOBatch, n_tokens: float, cfg, backward) -> dict:
    """PPO's loss of one micro-batch, the contract of grpo.batch_loss: each loss its share of the
    mini-batch's token mean, backpropagated by `backward` -- the critic's, then the actor's -- and
    their stats' sums returned."""
    model.set_adapter(CRITIC)
    # (b, R)
    values = token_values(model, batch.input_ids, batch.attention_mask, batch.response_start)
    loss, critic_stats = critic_loss(values, batch.values, batch.returns, batch.loss_mask, n_tokens,
                                     cfg.value_clip)
    # backward now, before the adapter changes: with gradient checkpointing, backward re-runs each
    # layer, and it must re-run it under the adapter that ran the forward pass
    backward(loss)
    model.set_adapter(ACTOR)
    # (b, R)
    logp, entropy = batch_logprobs(model, batch, cfg.temperature, with_entropy=True)
    loss, actor_stats = actor_loss(logp, batch.old_logp, batch.advantages, batch.loss_mask,
                                   n_tokens, cfg.clip_eps, entropy, cfg.entropy_coef)
    backward(loss)
    return {**critic_stats, **actor_stats}
