"""Tests of rollout.py on a tiny random-weight Qwen2 and the real Qwen2.5 tokenizer (CPU, seeded)."""
import argparse
from itertools import groupby
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from rollout import INVALID_ACTION, RolloutConfig, _sample, build_prompt, rollout
from wip_bench_rollout import add_arguments, bench_rollout

DATA = Path(__file__).parent.parent / "shared" / "data"
SPEC_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> "
    "query </search> and it will return the top searched results between <information> and </information>. You can "
    "search as many times as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: {question}\n"
)
SPEC_INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)


@pytest.fixture(scope="module")
def tok():
    path = DATA / "qwen2.5-tokenizer"
    if not path.exists():
        pytest.skip(f"the Qwen2.5 tokenizer is not at {path} (only in the project's offline setup)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def model():
    """A 2-layer Qwen2 with random weights and Qwen2.5's vocabulary size, so every tokenizer id is valid."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def forcing(plans):
    """A logits hook that forces plans[row][turn][step] (a token id; None lets the model choose)."""
    def hook(logits, rows, turn, step):
        for a, r in enumerate(rows.tolist()):
            plan = plans[r][turn] if turn < len(plans[r]) else []
            if step < len(plan) and plan[step] is not None:
                logits[a] = float("-inf")
                logits[a, plan[step]] = 0.0
        return logits
    return hook


def recording_search(calls):
    def search(queries):
        calls.append(list(queries))
        return [f"Doc 1(Title: {q}) all about {q}\n" for q in queries]
    return search


def prompts_for(tok, questions):
    return [build_prompt(q, tok, chat=False) for q in questions]


def test_build_prompt_base_text_is_spec_template_with_question_mark_rule(tok):
    expected = SPEC_PROMPT.format(question="who wrote hamlet?")  # stripped, "?" appended
    assert build_prompt("  who wrote hamlet ", tok, chat=False) == ids(tok, expected)
    assert tok.decode(build_prompt("  who wrote hamlet ", tok, chat=False)) == expected
    assert tok.decode(build_prompt("is it?", tok, chat=False)) == SPEC_PROMPT.format(question="is it?")


def test_build_prompt_chat_puts_spec_text_in_user_turn_of_template(tok):
    text = tok.decode(build_prompt("who wrote hamlet", tok, chat=True))
    user = SPEC_PROMPT.format(question="who wrote hamlet?")
    messages = [{"role": "user", "content": user}]
    assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert f"<|im_start|>user\n{user}<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_search_then_answer_gives_exact_tokens_text_and_loss_mask(tok, model):
    turn0 = [ids(tok, f" <think> hm </think> <search> q{r} </search>") for r in range(4)]
    turn1 = ids(tok, " <answer> y </answer>")
    calls = []
    cfg = RolloutConfig(max_turns=2, max_new_tokens=30, n_samples=2)
    trajs = rollout(model, tok, prompts_for(tok, ["a b", "c"]), recording_search(calls), cfg,
                    logits_hook=forcing([[turn0[r], turn1] for r in range(4)]))
    assert calls == [["q0", "q1", "q2", "q3"]]  # one batched search call for the whole turn
    for r, t in enumerate(trajs):
        obs = f"\n\n<information>Doc 1(Title: q{r}) all about q{r}</information>\n\n"
        assert t.prompt_ids == build_prompt(["a b", "c"][r // 2], tok, chat=False)  # prompt-major order
        assert t.response_ids == turn0[r] + ids(tok, obs) + turn1
        assert t.loss_mask == [1] * len(turn0[r]) + [0] * len(ids(tok, obs)) + [1] * len(turn1)
        assert t.text == f" <think> hm </think> <search> q{r} </search>{obs} <answer> y </answer>"
        assert (t.queries, t.n_searches, t.n_turns, t.answered) == ([f"q{r}"], 1, 2, True)
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)
        assert all(lp < 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 1)


def test_turn_without_action_gets_the_invalid_action_message(tok, model):
    assert INVALID_ACTION == SPEC_INVALID
    answer = ids(tok, " <answer> y </answer>")
    rambling = (ids(tok, " I am not sure") * 2)[: len(answer)]
    calls = []
    cfg = RolloutConfig(max_turns=2, max_new_tokens=len(answer), n_samples=1)  # turn 0 ends on its budget
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search(calls), cfg,
                   logits_hook=forcing([[rambling, answer]]))
    assert calls == []
    assert t.response_ids == rambling + ids(tok, SPEC_INVALID) + answer
    assert t.loss_mask == [1] * len(rambling) + [0] * len(ids(tok, SPEC_INVALID)) + [1] * len(answer)
    assert (t.n_searches, t.n_turns, t.answered) == (0, 2, True)


def test_eos_ends_the_turn_and_is_kept_as_a_sampled_token(tok, model):
    eos = tok.eos_token_id
    turn0 = ids(tok, " maybe") + [eos] + ids(tok, " never sampled")
    answer = ids(tok, " <answer> y </answer>")
    cfg = RolloutConfig(max_turns=2, max_new_tokens=20, n_samples=1)
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search([]), cfg,
                   logits_hook=forcing([[turn0, answer]]))
    sampled0 = ids(tok, " maybe") + [eos]
    assert t.response_ids == sampled0 + ids(tok, SPEC_INVALID) + answer  # no action before EOS: invalid
    assert t.loss_mask[: len(sampled0)] == [1] * len(sampled0)
    assert (t.n_turns, t.answered) == (2, True)


@pytest.mark.parametrize("max_turns", [0, 1])
def test_last_turn_after_max_turns_runs_no_search(tok, model, max_turns):
    search_turn = ids(tok, " <search> x </search>")
    calls = []
    cfg = RolloutConfig(max_turns=max_turns, max_new_tokens=20, n_samples=1)
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search(calls), cfg,
                   logits_hook=forcing([[search_turn] * 5]))
    obs = ids(tok, "\n\n<information>Doc 1(Title: x) all about x</information>\n\n")
    assert calls == [["x"]] * max_turns
    assert t.response_ids == (search_turn + obs) * max_turns + search_turn  # ends on the unexecuted search
    assert (t.n_searches, t.n_turns, t.answered, t.queries) == (max_turns, max_turns + 1, False, ["x"] * max_turns)


def test_stop_string_ending_inside_a_token_cuts_right_after_that_token(tok, model):
    turn0 = ids(tok, "<search>query</search>\n") + ids(tok, " after the stop")
    assert tok.decode(turn0[6]) == ">\n"  # Qwen: `</`, `search`, `>\n` — the stop ends inside the last token
    cfg = RolloutConfig(max_turns=1, max_new_tokens=20, n_samples=1)
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search([]), cfg,
                   logits_hook=forcing([[turn0, ids(tok, " <answer> a </answer>")]]))
    obs = ids(tok, "\n\n<information>Doc 1(Title: query) all about query</information>\n\n")
    assert t.response_ids[:7] == turn0[:7] and t.response_ids[7 : 7 + len(obs)] == obs
    assert t.queries == ["query"] and t.text.startswith("<search>query</search>\n\n\n<information>")


def mixed_plans(tok, n_rows):
    """Per row and turn: a few free tokens (their number varies), then a forced search or answer ending."""
    search, answer = ids(tok, " <search> q </search>"), ids(tok, " <answer> a </answer>")
    plans = []
    for r in range(n_rows):
        ends = [search, answer] if r % 3 == 0 else [search, search, answer]
        if r % 3 == 2:
            ends[0] = []  # runs to the turn budget: an invalid action
        plans.append([[None] * ((r * 2 + t * 3) % 5 + 1) + end for t, end in enumerate(ends)])
    return plans


def test_logprobs_equal_a_fresh_full_forward_pass(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth", "when did it happen"])
    cfg = RolloutConfig(max_turns=2, max_new_tokens=14, max_obs_tokens=40, temperature=0.8, n_samples=2)
    trajs = rollout(model, tok, prompts, recording_search([]), cfg, logits_hook=forcing(mixed_plans(tok, 6)),
                    generator=torch.Generator().manual_seed(0))
    assert len({t.n_turns for t in trajs}) > 1 and len({len(t.response_ids) for t in trajs}) == 6
    for t in trajs:
        seq = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():  # the logits that predict each response token
            logits = model(seq, logits_to_keep=len(t.response_ids) + 1).logits[0, :-1].float()
        full = torch.log_softmax(logits / cfg.temperature, dim=-1).gather(1, seq[0, len(t.prompt_ids) :, None])[:, 0]
        sampled = torch.tensor(t.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(t.logprobs)[sampled], full[sampled], atol=1e-4, rtol=0)
        assert all(lp == 0.0 for lp in torch.tensor(t.logprobs)[~sampled].tolist())


def test_greedy_batch_equals_each_prompt_rolled_out_alone(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth", "when did it happen", "why"])
    plans = mixed_plans(tok, 4)
    cfg = RolloutConfig(max_turns=2, max_new_tokens=12, max_obs_tokens=30, temperature=0.0, n_samples=1)
    batch = rollout(model, tok, prompts, recording_search([]), cfg, logits_hook=forcing(plans))
    for p, plan, together in zip(prompts, plans, batch):
        (alone,) = rollout(model, tok, [p], recording_search([]), cfg, logits_hook=forcing([plan]))
        assert alone.response_ids == together.response_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(together.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_sampling_follows_softmax_at_temperature_within_the_nucleus(temperature, top_p):
    torch.manual_seed(0)
    logits, draws = torch.randn(3, 12) * 2, 20000
    many = logits.repeat(draws, 1)  # (3 * draws, 12)
    cfg = RolloutConfig(temperature=temperature, top_p=top_p)
    tokens, logp = _sample(many, cfg, torch.Generator().manual_seed(0), None)
    freq = torch.zeros(3, 12).scatter_add_(1, tokens.view(draws, 3).t(), torch.ones(3, draws)) / draws
    p = torch.softmax(logits / temperature, dim=-1)
    p_sorted, order = p.sort(dim=-1, descending=True)
    in_nucleus = torch.zeros_like(p).scatter(1, order, (p_sorted.cumsum(-1) - p_sorted <= top_p).float())
    expected = p * in_nucleus / (p * in_nucleus).sum(-1, keepdim=True)
    assert (freq - expected).abs().max() < 0.015
    # the log-prob recorded is under softmax(logits / T) itself, nucleus or not
    torch.testing.assert_close(logp, torch.log_softmax(many / temperature, -1).gather(1, tokens[:, None])[:, 0])


def test_tiny_top_p_samples_the_most_likely_token(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth"])
    greedy = rollout(model, tok, prompts, recording_search([]),
                     RolloutConfig(max_turns=1, max_new_tokens=6, temperature=0.0, n_samples=1))
    nucleus = rollout(model, tok, prompts, recording_search([]),
                      RolloutConfig(max_turns=1, max_new_tokens=6, top_p=1e-6, n_samples=1))
    assert [t.response_ids for t in nucleus] == [t.response_ids for t in greedy]


def test_turn_and_token_budgets_hold_and_observations_are_truncated(tok, model):
    cfg = RolloutConfig(max_turns=2, max_new_tokens=9, max_obs_tokens=11, temperature=1.0, n_samples=3)
    search = ids(tok, " <search> x </search>")
    plans = [[search if (r + t) % 2 else [] for t in range(3)] for r in range(6)]  # searches and free sampling
    long_passages = lambda qs: ["Doc 1(Title: x) " + "many words " * 200 for _ in qs]  # noqa: E731
    trajs = rollout(model, tok, prompts_for(tok, ["a", "b c d"]), long_passages, cfg, logits_hook=forcing(plans),
                    generator=torch.Generator().manual_seed(1))
    full_obs = {"search": ids(tok, "\n\n<information>" + long_passages(["x"])[0].strip() + "</information>\n\n"),
                "invalid": ids(tok, SPEC_INVALID)}
    assert all(len(obs) > cfg.max_obs_tokens for obs in full_obs.values())
    assert all(t.n_searches == 1 and t.n_turns == 3 for t in trajs)  # one search each; free turns hit the budget
    for t in trajs:
        # alternating runs of sampled (1) and observation (0) tokens
        runs = [(m, [y for _, y in run]) for m, run in groupby(zip(t.loss_mask, t.response_ids), key=lambda p: p[0])]
        assert t.n_turns <= cfg.max_turns + 1 and [m for m, _ in runs].count(1) == t.n_turns
        assert all(len(run) <= cfg.max_new_tokens for m, run in runs if m == 1)
        assert all(run in (obs[: cfg.max_obs_tokens] for obs in full_obs.values()) for m, run in runs if m == 0)
        assert len(t.response_ids) <= (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens


def test_bench_rollout_runs_and_both_ways_sample_the_same_tokens(tok, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--trajectories", "3", "--tokens-per-turn", "12", "--obs-tokens", "10", "--prompt-tokens",
                              "5", "--hidden", "64", "--layers", "1", "--tokenizer", str(DATA / "qwen2.5-tokenizer")])
    results = bench_rollout(args)
    assert [r["lengths"] for r in results] == ["equal", "varied"] and all(r["same_tokens"] for r in results)
    assert results[0]["sampled_tokens"] == 3 * 3 * 12 and results[1]["sampled_tokens"] < 3 * 3 * 12
    assert "| equal | 108 |" in capsys.readouterr().out
