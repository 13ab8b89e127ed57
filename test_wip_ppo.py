"""ppo.py's tests (to be merged into test_searchr1.py): GAE, whitening, value clipping, masking, a PPO step."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import searchr1
from ppo import actor_loss, critic_loss, gae, token_rewards, whiten
from test_searchr1 import needs_qwen_tokenizer, steered, tiny_config, tiny_model_dir  # noqa: F401 (fixture)


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3))
    assert advantages[0].tolist() == pytest.approx([0.8, 0.5, 0.3])  # G_t = 1 at every t; A = G - V
    assert returns[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gae_with_discount_matches_the_hand_computed_recursion():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # delta_2 = 2 - 3 = -1;  delta_1 = 0 + 0.5*3 - 2 = -0.5;  delta_0 = 1 + 0.5*2 - 1 = 1
    # A_2 = -1;  A_1 = -0.5 + 0.25*(-1) = -0.75;  A_0 = 1 + 0.25*(-0.75) = 0.8125
    assert advantages[0].tolist() == pytest.approx([0.8125, -0.75, -1.0])
    assert returns[0].tolist() == pytest.approx([1.8125, 1.25, 2.0])


def test_gae_skips_observation_tokens_and_bootstraps_across_them():
    rewards = torch.tensor([[0.0, 7.0, 1.0]])   # the 7 sits on an observation token
    values = torch.tensor([[0.2, 9.0, 0.6]])
    advantages, _ = gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0]]), gamma=0.5)
    alone, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.6]]), torch.ones(1, 2), gamma=0.5)
    assert advantages[0, [0, 2]].tolist() == pytest.approx(alone[0].tolist())  # as if the block were absent
    assert advantages[0, 1] == 0.0


def test_whitening_uses_only_masked_positions():
    x = torch.tensor([[1.0, 1e6, 2.0], [3.0, -1e6, -1e6]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    white = whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0])
    expected = (kept - kept.mean()) / kept.std()
    assert white[mask.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert torch.all(white[~mask.bool()] == 0)


def test_token_rewards_put_the_outcome_on_the_last_sampled_token_and_the_kl_on_every_one():
    old = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # position 2 is an observation
    r = token_rewards(torch.tensor([1.0]), old, ref, mask, kl_coef=0.1)
    # r_t = -beta (log pi_old - log pi_ref), + 1 on the last sampled token
    assert r[0].tolist() == pytest.approx([-0.05, 0.0, 0.0, 1.1])


def test_value_clipping_binds_on_both_sides():
    old = torch.zeros(3)
    values = torch.tensor([1.0, -1.0, 1.0], requires_grad=True)
    returns = torch.tensor([2.0, -2.0, 0.0])
    loss, stats = critic_loss(values, old, returns, torch.ones(3), n_tokens=1, value_clip=0.5)
    # V_clip = 0.5, -0.5, 0.5: errors (1 vs 2.25), (1 vs 2.25), (1 vs 0.25) -> the max of each
    assert loss.item() == pytest.approx(0.5 * (2.25 + 2.25 + 1.0))
    assert stats["value_clip_frac"] == 2.0
    loss.backward()
    # where the clipped branch is the max, V gets no gradient; elsewhere d/dV 1/2 (V - G)^2 = V - G
    assert values.grad.tolist() == pytest.approx([0.0, 0.0, 1.0])


def _ppo_losses(logp, values, old_logp, ref_logp, old_values, mask, outcome):
    """The tensor half of ppo_update: token rewards -> GAE -> whitening -> actor and critic losses."""
    rewards = token_rewards(outcome, old_logp, ref_logp, mask)
    advantages, returns = gae(rewards, old_values, mask, gamma=0.9, lam=0.8)
    advantages = whiten(advantages, mask)
    n = mask.sum()
    return actor_loss(logp, old_logp, advantages, mask, n)[0] + critic_loss(values, old_values, returns, mask, n)[0]


def test_observation_tokens_change_neither_the_actor_nor_the_critic_gradient():
    g = torch.Generator().manual_seed(0)
    B, R = 3, 7
    mask = (torch.rand(B, R, generator=g) > 0.3).float()
    mask[:, 0] = 1
    logp = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
    values = torch.randn(B, R, generator=g).requires_grad_()
    old_logp = logp.detach() + 0.1 * torch.randn(B, R, generator=g)
    ref_logp = logp.detach() + 0.1 * torch.randn(B, R, generator=g)
    old_values = values.detach() + 0.1 * torch.randn(B, R, generator=g)
    outcome = torch.tensor([1.0, 0.0, 1.0])
    grads = []
    for junk in (0.0, 1e4):  # what the observation positions hold: must not matter
        poison = lambda x: torch.where(mask.bool(), x, torch.full_like(x, junk))
        loss = _ppo_losses(logp, values, poison(old_logp), poison(ref_logp), poison(old_values), mask, outcome)
        grads.append(torch.autograd.grad(loss, (logp, values)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
        assert torch.all(a[mask == 0] == 0) and torch.any(a[mask == 1] != 0)


# ============================================================================ a PPO step on a 4-bit base
def ppo_config(model_dir, folder, **overrides):
    return tiny_config(model_dir, folder, algo="ppo", batch_size=2, micro_batch_size=1, critic_lr=1e-2,
                       **overrides)


@needs_qwen_tokenizer
def test_a_ppo_step_changes_only_the_two_adapters_and_the_value_head(tiny_model_dir, tmp_path, monkeypatch):
    cfg = ppo_config(tiny_model_dir, tmp_path)
    assert cfg.group_size == 1  # forced by --algo ppo
    tokenizer, model = searchr1.load_policy(cfg, torch.device("cpu"))
    steered(monkeypatch, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(searchr1.param_groups(model, cfg.lr, cfg.critic_lr))
    questions = searchr1.load_qa(cfg.train_data)[:2]
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats = searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    assert stats["reward"] == 0.5  # rows answer y, z
    for key in ("value_loss", "explained_variance", "value_clip_frac", "policy_loss", "kl"):
        assert key in stats and stats[key] == stats[key], key  # present and not nan
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert any("lora_B.default" in k for k in changed)
    assert any("lora_B.critic" in k for k in changed)
    assert {"value_head.weight", "value_head.bias"} <= changed
    assert all("lora_" in k or k.startswith("value_head.") for k in changed)  # the 4-bit base is untouched
    assert model.active_adapter == "default"  # the next rollout samples from the policy


@needs_qwen_tokenizer
def test_resumed_ppo_run_takes_the_same_next_step_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    steered(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    straight = ppo_config(tiny_model_dir, tmp_path / "straight")
    searchr1.train(straight)

    crashed = ppo_config(tiny_model_dir, tmp_path / "crashed")
    real_step = searchr1.train_step
    calls = []
    def crash_on_second_step(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_step(*args)
    monkeypatch.setattr(searchr1, "train_step", crash_on_second_step)
    with pytest.raises(RuntimeError, match="killed"):
        searchr1.train(crashed)
    monkeypatch.setattr(searchr1, "train_step", real_step)
    searchr1.train(replace(crashed, resume=True))

    rows = [json.loads(line) for line in (Path(straight.out_dir) / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (Path(crashed.out_dir) / "metrics.jsonl").open()]
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("reward", "policy_loss", "value_loss", "explained_variance", "value_clip_frac", "kl", "grad_norm"):
        assert resumed[1][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-9), key
    assert rows[1]["kl"] > 0  # the second step really starts from the restored actor
    from safetensors.torch import load_file
    for name in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "value_head.safetensors"):
        a = load_file(Path(straight.out_dir) / "checkpoints" / "step-000002" / name)
        b = load_file(Path(crashed.out_dir) / "checkpoints" / "step-000002" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
