"""searchr1's tests: small, seeded, offline, each named for the behaviour it proves."""
import math

import pytest
import torch

from eval import (DataError, exact_match, extract_answer, load_qa, normalize_answer,
                  read_qa_file, sub_exact_match, token_f1)
from grpo import clipped_policy_loss, group_advantages, grpo_loss, low_var_kl, token_logprobs


# ============================================================================ eval.py
def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole words are articles


def test_exact_match_is_one_for_any_golden_answer_after_normalisation():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match(None, ["Beatles"]) == 0.0


def test_sub_exact_match_and_f1_give_partial_credit():
    assert sub_exact_match("the Beatles band", ["beatles"]) == 1.0
    assert sub_exact_match("Stones", ["Rolling Stones"]) == 0.0
    assert token_f1("Rolling Stones band", ["The Rolling Stones"]) == pytest.approx(0.8)
    assert token_f1("nothing", ["Beatles"]) == 0.0


def test_extract_answer_takes_the_last_answer_tag_stripped():
    response = "<think>x</think><answer> Paris </answer> wait <answer>\n Lyon\n</answer>"
    assert extract_answer(response) == "Lyon"
    assert extract_answer("<search> q </search>") is None


def test_qa_file_errors_name_the_file_line_and_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n'
                    '{"id": "2", "question": "q?", "golden_answers": "a"}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'golden_answers'"):
        read_qa_file(path)
    path.write_text('{"id": "1", "golden_answers": ["a"]}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'question'"):
        read_qa_file(path)
    path.write_text('{"id": "1", "question": \n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: invalid JSON"):
        read_qa_file(path)


def test_hub_benchmark_is_downloaded_by_name_and_split(tmp_path, monkeypatch):
    import huggingface_hub
    local = tmp_path / "test.jsonl"
    local.write_text('{"id": "t0", "question": "who?", "golden_answers": ["me"]}\n')
    asked = []
    def fake_download(repo_id, filename, repo_type):
        asked.append((repo_id, filename, repo_type))
        return str(local)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_qa("bamboogle")[0]["golden_answers"] == ["me"]
    assert load_qa("nq", "train")[0]["id"] == "t0"
    assert asked == [("RUC-NLPIR/FlashRAG_datasets", "bamboogle/test.jsonl", "dataset"),
                     ("RUC-NLPIR/FlashRAG_datasets", "nq/train.jsonl", "dataset")]
    with pytest.raises(DataError, match="unknown dataset 'nqq'"):
        load_qa("nqq")


# ============================================================================ grpo.py
def test_group_advantages_are_reward_minus_group_mean_over_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0,  0.0, 0.0, 0.0, 0.0, 0.0])
    advantages = group_advantages(rewards, group_size=5)
    std = math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 4)  # unbiased: divide by G - 1
    expected = [0.4 / std, -0.6 / std, -0.6 / std, 0.4 / std, 0.4 / std] + [0.0] * 5
    assert advantages.tolist() == pytest.approx(expected, abs=1e-5)


def test_group_of_one_keeps_its_reward_and_all_equal_groups_get_zero():
    assert group_advantages(torch.tensor([1.0, 0.0]), group_size=1).tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    assert group_advantages(torch.tensor([1.0, 1.0, 1.0]), group_size=3).tolist() == [0.0, 0.0, 0.0]


def test_clipping_stops_the_gradient_only_past_the_bound_in_the_advantage_direction():
    old = torch.zeros(4)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, -1, -1, +1
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipped = clipped_policy_loss(logp, old, advantages, clip_eps=0.2)
    # -A * clip(ratio) where the clip binds (1.2 for A>0 above, 0.8 for A<0 below), else -A * ratio
    assert loss.tolist() == pytest.approx([-1.2, 0.8, 1.5, -0.5])
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]
    loss.sum().backward()
    # d(-A ratio)/d logp = -A ratio where unclipped; 0 where the clip binds
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 1.5, -0.5])


def test_low_variance_kl_is_zero_at_the_reference_positive_elsewhere_and_clamped():
    logp = torch.tensor([-1.0, -1.0, -1.0, -30.0])
    ref = torch.tensor([-1.0, -2.0, 0.0, 0.0])
    kl = low_var_kl(logp, ref)
    d = ref - logp
    assert kl[0] == 0.0
    assert kl[1:3].tolist() == pytest.approx((torch.exp(d[1:3]) - d[1:3] - 1).tolist())
    assert kl[3] == 10.0


def _loss_inputs(seed=0, B=3, R=6):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, R, generator=g)
    ref = logp.detach() + 0.3 * torch.randn(B, R, generator=g)
    advantages = torch.randn(B, generator=g)
    loss_mask = (torch.rand(B, R, generator=g) > 0.4).float()
    return logp, old, ref, advantages, loss_mask


def test_masked_positions_holding_huge_values_change_neither_loss_nor_gradient():
    logp, old, ref, advantages, loss_mask = _loss_inputs()
    n = loss_mask.sum()
    clean_loss, _ = grpo_loss(logp, old, ref, advantages, loss_mask, n)
    (clean_grad,) = torch.autograd.grad(clean_loss, logp)
    poisoned_old = torch.where(loss_mask.bool(), old, torch.full_like(old, 1e30))
    poisoned_ref = torch.where(loss_mask.bool(), ref, torch.full_like(ref, float("nan")))
    loss, _ = grpo_loss(logp, poisoned_old, poisoned_ref, advantages, loss_mask, n)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == clean_loss.item()
    assert torch.equal(grad, clean_grad)
    assert torch.all(grad[loss_mask == 0] == 0) and torch.any(grad[loss_mask == 1] != 0)


def test_loss_is_the_token_mean_of_policy_and_kl_terms():
    logp, old, ref, advantages, loss_mask = _loss_inputs(seed=1)
    loss, stats = grpo_loss(logp, old, ref, advantages, loss_mask, loss_mask.sum(), kl_coef=0.1)
    ratio = torch.exp(logp - old)
    A = advantages[:, None]
    per_token = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
    d = ref - logp
    per_token = per_token + 0.1 * (torch.exp(d) - d - 1)
    expected = (per_token * loss_mask).sum() / loss_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_micro_batching_does_not_change_the_mini_batch_gradient():
    logp, old, ref, advantages, loss_mask = _loss_inputs(seed=2, B=4)
    n = loss_mask.sum()
    whole, _ = grpo_loss(logp, old, ref, advantages, loss_mask, n)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts = sum(grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], advantages[i:i + 1],
                          loss_mask[i:i + 1], n)[0] for i in range(4))
    (parts_grad,) = torch.autograd.grad(parts, logp)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(parts_grad, whole_grad)


def tiny_qwen2(vocab_size=128, seed=0, **overrides):
    """A random-weight Qwen2 small enough for the CPU, built from a config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, **overrides)
    return Qwen2ForCausalLM(config).eval()


def test_token_logprobs_of_a_padded_batch_equal_each_sequence_alone():
    model = tiny_qwen2()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (5, 3)]
    responses = [torch.randint(1, 128, (n,), generator=g) for n in (4, 6)]
    P, R = 5, 6
    input_ids = torch.zeros(2, P + R, dtype=torch.long)
    attention_mask = torch.zeros(2, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p): P + len(r)] = torch.cat([p, r])
        attention_mask[i, P - len(p): P + len(r)] = 1
    with torch.no_grad():
        batched = token_logprobs(model, input_ids, attention_mask, response_start=P)  # (2, R)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            alone = torch.log_softmax(model(torch.cat([p, r])[None]).logits[0], dim=-1)
            expected = alone[len(p) - 1: -1].gather(-1, r[:, None]).squeeze(-1)
            assert torch.allclose(batched[i, : len(r)], expected, atol=1e-5)
