"""health.py's tests: each signal on hand-made trajectories with its exact value, the checks on
synthetic histories (a healthy run raises nothing, a collapse warns at the step it breaks), and
which trajectories get flagged. No model, no tokenizer: offline and fast."""
import math
import re
from pathlib import Path

import pytest

import health
from rollout import Trajectory

SEARCH = "<think> I need the city of Bavoki. </think> <search> Bavoki city </search>\n"
ANSWER = "<think> The city of Bavoki is Zorlan. </think> <answer> Zorlan </answer>"


def trajectory(*turns, queries=(), answered=None, invalid=0, cut=0, tokens=4) -> Trajectory:
    """A trajectory as the rollout leaves it: `tokens` policy tokens, then 2 observation tokens."""
    answered = turns[-1].rstrip().endswith("</answer>") if answered is None else answered
    return Trajectory(prompt_ids=[1], turns=list(turns), queries=list(queries), answered=answered,
                      invalid_actions=invalid, cut_turns=cut, loss_mask=[1] * tokens + [0, 0],
                      response_ids=[7] * (tokens + 2), text="".join(turns))


GOOD = trajectory(SEARCH, ANSWER + " <|im_end|>\n", queries=["Bavoki city"])


# ---------------------------------------------------------------------------- one trajectory
def test_a_trajectory_that_follows_the_protocol_is_well_formed():
    assert health.follows_format(GOOD)
    assert health.follows_format(trajectory(ANSWER))  # answering at once is allowed
    assert health.broken_tags(GOOD) == 0


@pytest.mark.parametrize("turns", [
    ["<search> Bavoki city </search>", ANSWER],                             # no reasoning
    [SEARCH],                                                               # never answered
    [ANSWER + " Zorlan is a city."],                                        # text after the answer
    ["<think> I <search> x </search> need it. </think> <answer> a </answer>"],  # tag in <think>
    ["<think>  </think> <answer> Zorlan </answer>"],                        # blank reasoning
    ["<think> ok </think> <answer> Zorlan </answer><|im_start|>"],           # not an EOS text
    ["<think> x </think> <search> q </search> <information> made up </information>", ANSWER],
    ["<think] I need it. </think> <answer> Zorlan </answer>"],              # a broken tag
])
def test_each_break_of_the_protocol_is_caught(turns):
    assert not health.follows_format(trajectory(*turns))


def test_broken_tag_fragments_are_counted_exactly():
    text = ("<think> a <think] b </search c <answer d </ think> <thin> <Think> <thinking> "
            "</think> x < 3 <|im_end|> <b> <answer> e </answer>")
    # broken: <think]  </search  <answer  </ think>  <thin>  <Think>  <thinking>  (7);
    # whole: <think> </think> <answer> </answer>; not tag-like: "< 3", <|im_end|>, <b>
    assert health.broken_tags(trajectory(text)) == 7


def test_a_repeated_phrase_is_the_share_of_repeated_4grams():
    looped = trajectory("go to the shop go to the shop")  # 5 four-grams, 4 distinct
    assert health.repeated_4grams(looped) == pytest.approx(0.2)
    assert health.repeated_4grams(trajectory("too few words")) == 0.0
    assert health.repeated_4grams(GOOD) == 0.0


def test_letters_in_a_script_the_prompt_does_not_use_are_foreign():
    mixed = trajectory("Paris Пар")  # 5 Latin letters, 3 Cyrillic
    latin = health.scripts_of(health.PROMPT_TEMPLATE)
    assert latin == {"LATIN"}
    assert health.foreign_letters(mixed, latin) == pytest.approx(3 / 8)
    measured = health.measure([mixed], 1, prompt_text="Какой город?")
    russian = health.step_signals([mixed], measured, [0.0], 1)
    assert russian["foreign_letters"] == 0.0  # the question's own script is the prompt's


def test_characters_that_are_not_text_are_counted():
    garbage = trajectory("ab\ufffd\x07 c\u200b\n")  # non-space: a b U+FFFD BEL c ZWSP
    assert health.non_text_chars(garbage) == pytest.approx(3 / 6)
    assert health.non_text_chars(GOOD) == 0.0


# ---------------------------------------------------------------------------- one step
def test_groups_with_equal_rewards_give_no_signal():
    trajectories = [GOOD] * 8
    rewards = [0, 0, 1, 1, 0, 1, 1, 0]  # groups of 2: all wrong, all right, mixed, mixed
    signals = health.step_signals(trajectories, health.measure(trajectories, 2), rewards, 2)
    assert signals["no_signal_groups"] == 0.5
    assert signals["all_wrong_groups"] == 0.25
    assert signals["all_right_groups"] == 0.25


def test_a_group_of_one_has_no_group_signals():
    step = [GOOD, GOOD]
    signals = health.step_signals(step, health.measure(step, 1), [0.0, 1.0], group_size=1)
    assert not set(health.GROUP_SIGNALS) & set(signals)
    assert set(signals) | set(health.GROUP_SIGNALS) == set(health.DEFINITIONS)


def test_cut_turns_and_invalid_actions_are_rates_per_turn():
    cut = trajectory("<think> I need the city of", SEARCH, ANSWER, queries=["Bavoki city"],
                     invalid=1, cut=1)
    step = [cut, trajectory(ANSWER)]
    signals = health.step_signals(step, health.measure(step, 1), [1.0, 1.0], group_size=1)
    assert signals["invalid_per_turn"] == 1 / 4  # 1 invalid action, 4 sampled turns
    assert signals["cut_per_turn"] == 1 / 4


def test_a_query_another_response_to_the_same_question_issued_is_a_duplicate():
    group = [trajectory(ANSWER, queries=["Bavoki city", "Zorlan sport"]),
             trajectory(ANSWER, queries=[" bavoki  CITY "]),           # shares A's first query
             trajectory(ANSWER, queries=["Tuzel food", "Tuzel food"])]  # repeats only itself
    other = [trajectory(ANSWER, queries=["Zorlan sport"]), trajectory(ANSWER), trajectory(ANSWER)]
    assert health.duplicate_queries(group) == 2
    step = group + other
    signals = health.step_signals(step, health.measure(step, 3), [0.0] * 6, group_size=3)
    assert signals["duplicate_queries"] == 2 / 6  # another group's same query does not count


def test_answers_without_search_and_policy_tokens():
    guess = trajectory(ANSWER, tokens=3)
    searched = trajectory(SEARCH, ANSWER, queries=["q"], tokens=9)
    step = [guess, searched]
    signals = health.step_signals(step, health.measure(step, 1), [0.0, 1.0], group_size=1)
    assert signals["no_search_answers"] == 0.5
    assert signals["policy_tokens"] == 6.0  # (3 + 9) / 2: observation tokens not counted


# ---------------------------------------------------------------------------- the checks
def healthy_row(step: int) -> dict:
    """A tiny run that learns: reward 0.1 -> 1.0 by step 16, groups all right at the end, length
    doubling as it learns to search, entropy falling, format and KL steady."""
    reward = min(1.0, 0.1 + 0.06 * (step - 1)) - 0.03 * (step % 2) * (step < 16)
    return {"reward": reward, "format_ok": 1.0 - 0.02 * (step % 3), "broken_tags": 0.0,
            "repeated_4grams": 0.01, "foreign_letters": 0.0, "non_text_chars": 0.0,
            "invalid_per_turn": 0.02 * (step < 5), "cut_per_turn": 0.0,
            "no_search_answers": max(0.0, 0.8 - 0.1 * step),
            "duplicate_queries": min(1.0, step / 20),
            "policy_tokens": 15.0 if step <= 5 else 30.0,
            "all_right_groups": reward ** 5, "all_wrong_groups": (1 - reward) ** 5,
            "no_signal_groups": reward ** 5 + (1 - reward) ** 5,
            "entropy": max(0.1, 0.5 - 0.01 * step), "kl": 0.02 + 0.001 * step, "clip_frac": 0.02,
            "grad_norm": 0.03 * (1 + step % 10), "response_len": 20.0 + step}


def test_a_healthy_run_raises_no_warning():
    monitor = health.Monitor()
    for step in range(1, 61):
        assert monitor.check(healthy_row(step), step) == [], step


def test_a_collapsing_format_warns_at_the_step_it_breaks():
    monitor, warned = health.Monitor(), {}
    for step in range(1, 31):  # the reward stays at 1.0 throughout: it lags the reasoning
        row = healthy_row(step) | {"reward": 1.0, "format_ok": 1.0 - 0.04 * max(0, step - 10)}
        warned[step] = monitor.check(row, step)
    first = min(step for step, warnings in warned.items() if warnings)
    # the median of steps 15-17 is step 16's 1 - 0.04 x 6 = 0.76: 0.24 below the best, more than 0.2
    assert first == 17
    (w,) = warned[17]
    assert (w.signal, w.reference) == ("format_ok", 1.0)
    assert w.value == pytest.approx(0.72)
    assert w.message == ("format_ok 0.72 (median of the last 3 steps 0.76, best 1 at step 1): responses "
                         "break the tag protocol; see samples.jsonl step 17")
    reminded = [step for step, warnings in warned.items() if warnings]
    assert reminded == [17, 27]  # while it stays broken: once every REMIND_EVERY steps
    assert monitor.bar(row) == {"format": "0.20", "no_signal": "1.00", "warn": "format_ok"}


def test_all_equal_groups_warn_only_while_the_reward_is_not_solved():
    solved, stuck = health.Monitor(), health.Monitor()
    for step in range(1, 21):
        assert solved.check(healthy_row(40) | {"no_signal_groups": 1.0}, step) == []
    warnings = [stuck.check(healthy_row(40) | {"no_signal_groups": 0.95, "reward": 0.03}, step)
                for step in range(1, 21)]
    assert [step for step, w in enumerate(warnings, 1) if w] == [10, 20]  # STUCK_STEPS in a row
    assert warnings[9][0].message.startswith("no_signal_groups 0.95 (above 0.9 for 10 steps, "
                                             "reward 0.03)")


def test_a_number_that_is_not_a_number_warns_at_once():
    monitor = health.Monitor()
    monitor.check(healthy_row(1), 1)
    (w,) = monitor.check(healthy_row(2) | {"kl": math.nan}, 2)
    assert w.signal == "kl" and "not a number" in w.message


# ---------------------------------------------------------------------------- flagged trajectories
def test_flagged_marks_exactly_the_broken_trajectories():
    trajectories = [
        GOOD,
        trajectory("<think] I need it. </think> <answer> Zorlan </answer>"),
        trajectory("<think>" + " go" * 12 + " </think> <answer> go </answer>"),
        trajectory("<think> Париж, Москва </think> <answer> Zorlan </answer>"),
        trajectory("<think> I\x17 know. </think> <answer> Zorlan </answer>"),
        trajectory("<think> I need the city of", ANSWER, invalid=1, cut=1),
        trajectory(ANSWER),
    ]
    assert health.flagged(health.measure(trajectories, 1), [1.0] * 7, group_size=1) == {
        1: ["bad_format", "broken_tags"],
        2: ["repetition"],
        3: ["foreign_letters"],
        4: ["non_text_chars"],  # a control character breaks no tag
        5: ["bad_format", "cut_turn", "invalid_action"],
    }


def test_flagged_keeps_a_few_a_check_the_rewarded_ones_first():
    broken = trajectory("<think] I need it. </think> <answer> Zorlan </answer>")
    rewards = [0, 0, 0, 1, 0, 1, 0, 0]  # groups of 2; rewarded in the second and third
    chosen = health.flagged(health.measure([broken] * 8, 2), rewards, group_size=2)
    assert len(chosen) == health.FLAGGED_PER_CHECK == 4
    assert sorted(chosen) == [0, 1, 3, 5]  # those the update reinforces, then in order


def test_readme_defines_every_signal_as_health_does():
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", readme, flags=re.MULTILINE))
    assert {name: rows.get(name) for name in health.DEFINITIONS} == health.DEFINITIONS


def test_a_resumed_run_s_monitor_knows_its_past_and_warns_only_on_what_is_new():
    """Monitor(past): the rows a resumed run logged before are replayed, so a check that compares with
    the run's best still has it, and nothing about the past is said again."""
    past = [{"step": s, "format_ok": 1.0} for s in range(1, 6)] + [{"step": 6, "format_ok": 0.7}]
    monitor = health.Monitor(past)
    (warning,) = monitor.check({"step": 7, "format_ok": 0.7}, 7)  # the median of steps 5-7: 0.7
    assert warning.signal == "format_ok" and warning.reference == 1.0 and "step 7" in warning.message
