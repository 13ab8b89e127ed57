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


def test_chunked_logprobs_give_the_same_values_and_gradients_as_one_chunk():
    model = tiny_qwen2()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 128, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    results = []
    for chunk in (3, 1000):
        model.zero_grad()
        logp = token_logprobs(model, input_ids, attention_mask, response_start=4, chunk=chunk)  # (2, 8)
        (logp * torch.linspace(-1, 1, 8)).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (chunked, chunked_grads), (whole, whole_grads) = results
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked_grads, whole_grads))


# ============================================================================ searchr1.py: training
import functools
import json
from pathlib import Path

import searchr1
from rollout import rollout as real_rollout

QWEN_TOKENIZER = Path(__file__).resolve().parent.parent / "shared" / "data" / "qwen2.5-tokenizer"
needs_qwen_tokenizer = pytest.mark.skipif(not QWEN_TOKENIZER.exists(),
                                          reason="../shared/data/qwen2.5-tokenizer is absent")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random Qwen2 with the real Qwen2.5 tokenizer, saved like a hub checkpoint."""
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen2(vocab_size=151936).save_pretrained(folder)
    AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(folder)
    return folder


def answer_every_other(tokenizer):
    """A logits hook that makes even rows answer "y" and odd rows "z": groups with mixed rewards."""
    targets = [tokenizer.encode(f"<answer> {a} </answer>") for a in ("y", "z")]
    def hook(logits, rows, turn, step):
        forced = torch.full_like(logits, -1e9)
        for i, row in enumerate(rows.tolist()):
            target = targets[row % 2]
            forced[i, target[step] if step < len(target) else tokenizer.eos_token_id] = 0.0
        return forced
    return hook


def steered(monkeypatch, tokenizer):
    monkeypatch.setattr(searchr1, "rollout",
                        functools.partial(real_rollout, logits_hook=answer_every_other(tokenizer)))


def write_task(folder: Path, n_questions=8):
    """A 3-passage corpus and QA files whose golden answer is "y"."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\npassage number {i}'}) + "\n"
                              for i in range(3)))
    qa = folder / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question {i}", "golden_answers": ["y"]}) + "\n"
                          for i in range(n_questions)))
    return corpus, qa


def tiny_config(model_dir, folder, **overrides):
    corpus, qa = write_task(folder)
    settings = dict(model=str(model_dir), train_data=str(qa), eval_data=str(qa), corpus=str(corpus),
                    index_dir=str(folder / "index"), out_dir=str(folder / "run"), device="cpu",
                    batch_size=2, group_size=4, updates_per_step=2, micro_batch_size=3, lr=1e-2,
                    max_turns=1, max_new_tokens=8, eval_size=2, eval_batch_size=2, steps=2,
                    save_every=1, eval_every=0)
    settings.update(overrides)
    return searchr1.Config(**settings)


@needs_qwen_tokenizer
def test_a_training_step_on_4bit_lora_changes_only_the_adapter_and_uses_the_base_as_reference(
        tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    tokenizer, model = searchr1.load_policy(cfg, torch.device("cpu"))
    assert "Linear4bit" in type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__
    steered(monkeypatch, tokenizer)
    seen = []  # the (logp, ref_logp, loss_mask) of every micro-batch the loss sees
    def spy(logp, old_logp, ref_logp, advantages, loss_mask, *args):
        seen.append((logp.detach(), ref_logp, loss_mask))
        return searchr1_grpo_loss(logp, old_logp, ref_logp, advantages, loss_mask, *args)
    searchr1_grpo_loss = searchr1.grpo_loss
    monkeypatch.setattr(searchr1, "grpo_loss", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    questions = searchr1.load_qa(cfg.train_data)[:2]
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats = searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    assert stats["reward"] == 0.5 and stats["answered"] == 1.0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)

    # a second step: the adapter has moved, so policy and reference differ; the reference must be
    # exactly the base model, loaded afresh without any adapter
    seen.clear()
    searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    _, fresh = searchr1.load_policy(cfg, torch.device("cpu"))  # a new adapter adds exactly 0 (B = 0)
    trajectories = searchr1.rollout(model, tokenizer, [searchr1.build_prompt(q["question"], tokenizer, False)
                                                       for q in questions], search, cfg.rollout_config())
    mb = searchr1.pack(trajectories[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logp = searchr1.micro_batch_logprobs(fresh, mb, torch.device("cpu"), 1.0)
    logp, ref_logp, mask = seen[0]
    in_loss = mask.bool()
    assert torch.allclose(ref_logp[in_loss], base_logp[in_loss], atol=1e-5)
    assert not torch.allclose(logp[in_loss], ref_logp[in_loss], atol=1e-3)


@needs_qwen_tokenizer
def test_resumed_run_takes_the_same_next_step_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    steered(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    straight = tiny_config(tiny_model_dir, tmp_path / "straight")
    searchr1.train(straight)

    crashed = tiny_config(tiny_model_dir, tmp_path / "crashed")
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
    searchr1.train(dataclasses_replace(crashed, resume=True))

    rows = [json.loads(line) for line in (Path(straight.out_dir) / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (Path(crashed.out_dir) / "metrics.jsonl").open()]
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("reward", "policy_loss", "kl", "grad_norm", "lr"):
        assert resumed[1][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-9), key
    assert rows[1]["kl"] > 0  # the step after the first really depends on the restored adapter
    from safetensors.torch import load_file
    a = load_file(Path(straight.out_dir) / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    b = load_file(Path(crashed.out_dir) / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


from dataclasses import replace as dataclasses_replace
