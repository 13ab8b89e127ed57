"""Run health: is training going wrong, and where to look?

How a Search-R1 run collapses. People who train these agents report runs whose reward falls
to zero while the model writes gibberish. A second look at such runs found that the reasoning
goes first: the <think> channel fills with rows of broken tags (`<think]`, `</search` without its
`>`) while the answers are still right. The reward scores only the final answer, so it lags:
by the time it falls, the reasoning has been broken for many steps. This chapter watches the
text itself, every step, and tells the user as soon as it changes.

    measure       each trajectory's text measures (format, broken tags, repetition, script,
                  non-text, cut turns, invalid actions), computed once a step
    step_signals  a dict of floats for metrics.jsonl, from one step's trajectories, their
                  measures and rewards (DEFINITIONS below says what each one is, in one line)
    Monitor       holds the history of those rows; check() turns it into HealthWarnings, one
                  line each, and bar() gives the two numbers that go on the progress bar
    flagged       which trajectories of a step trip a per-trajectory check on their measures,
                  and which checks, so the trainer can write them to samples.jsonl marked with them

What each group of signals catches
    learning signal  a group whose G rewards are all equal has advantage 0 for every member
                     (grpo.group_advantages): GRPO learns nothing from it
    format           the protocol the prompt asks for, and broken tag fragments: the first sign
    degeneration     loops (repeated 4-grams), another script, characters that are not text
    behaviour        invalid actions, cut turns, answers without a search, queries a group shares

Who reads this: searchr1.py's training loop measures the step's trajectories once, adds
step_signals to the metrics row, passes the row to Monitor.check and writes its warnings, and
writes the flagged trajectories to samples.jsonl. Everything here is plain Python over the
trajectories' text and counts: no model pass, nothing from the other chapters but rollout's
prompt and Trajectory.
"""
import math
import re
import statistics
import unicodedata
from dataclasses import dataclass

from rollout import PROMPT_TEMPLATE, Trajectory

DEFINITIONS = {
    "no_signal_groups": "share of groups with all rewards equal (advantage 0: nothing to learn)",
    "all_wrong_groups": "share of groups whose rewards are all 0",
    "all_right_groups": "share of groups whose rewards are all 1",
    "format_ok": "share of trajectories that follow the protocol in every turn (follows_format)",
    "broken_tags": "broken tag fragments (`<think]`, `</search`, `<thin>`) per trajectory",
    "repeated_4grams": "share of the policy text's word 4-grams that repeat an earlier one, mean",
    "foreign_letters": "share of the letters in a script the prompt does not use, mean",
    "non_text_chars": "share of non-space characters that are U+FFFD or control/format/unassigned",
    "invalid_per_turn": "invalid actions (neither search nor answer) per sampled turn",
    "cut_per_turn": "turns cut by the token budget before an action, per sampled turn",
    "no_search_answers": "share of trajectories that answered without any search",
    "duplicate_queries": "share of queries that another response to the same question also issued",
    "policy_tokens": "tokens the policy sampled per trajectory (response_len adds the passages)",
}
GROUP_SIGNALS = ("no_signal_groups", "all_wrong_groups", "all_right_groups", "duplicate_queries")
# ^ left out when group_size is 1 (PPO): a group of one is always "all equal", and shares nothing

# ============================================================================ one trajectory
TAGS = ("think", "search", "answer", "information")
WELL_FORMED_TAGS = {f"<{name}>" for name in TAGS} | {f"</{name}>" for name in TAGS}
# A tag-like fragment: "<", maybe "/", spaces allowed, then a word that starts as a tag name does
# (thi, sea, ans, inf) and, if it comes next, the closing ">". It is broken unless it is exactly
# one of WELL_FORMED_TAGS: <think] <Think> <thin> <thinking> </ think>, </search or <answer with
# no ">" after them.
# A well-formed tag in the wrong place (<search> inside <think>) is no fragment: follows_format
# catches it. "<" before other words ("x < 3", "<|im_end|>") is never a fragment.
_TAG_LIKE = re.compile(r"<\s*/?\s*(?:" + "|".join(n[:3] for n in TAGS) + r")\w*>?", re.IGNORECASE)
_NO_TAG = r"(?:(?!</?(?:" + "|".join(TAGS) + r")>).)*"  # text that holds no well-formed tag
# End-of-sequence text a turn may end with, as decoded: Qwen2.5's and Llama 3's
EOS_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
_AFTER_ACTION = r"(?:\s|" + "|".join(map(re.escape, EOS_TEXTS)) + r")*"
# One turn as the prompt asks for it: reasoning, then one action, then only whitespace or EOS
_TURN = re.compile(rf"\s*<think>({_NO_TAG})</think>\s*<(search|answer)>({_NO_TAG})</\2>"
                   + _AFTER_ACTION, re.DOTALL)  # groups: reasoning, action, query or answer


def policy_text(t: Trajectory) -> str:
    """What the policy wrote: its turns, without the passages or messages put between them."""
    return "\n".join(t.turns)


def follows_format(t: Trajectory) -> bool:
    """Every turn is `<think> reasoning </think> <search> query </search>`, the last one with
    `<answer> answer </answer>` instead, nothing but whitespace or EOS text after the action;
    reasoning, query and answer are not blank and hold no tag, broken or whole."""
    for k, turn in enumerate(t.turns):
        m = _TURN.fullmatch(turn)
        action = "answer" if k == len(t.turns) - 1 else "search"
        if not m or m[2] != action or not m[1].strip() or not m[3].strip():
            return False
    return bool(t.turns) and broken_tags(t) == 0


def broken_tags(t: Trajectory) -> int:
    """Tag-like fragments in the policy's text that are not well-formed tags (_TAG_LIKE above)."""
    fragments = _TAG_LIKE.findall(policy_text(t))
    return sum(f not in WELL_FORMED_TAGS for f in fragments)


def repeated_4grams(t: Trajectory) -> float:
    """(4-grams - distinct 4-grams) / 4-grams over the whitespace-split words; 0 under 4 words.
    A loop writes the same 4-grams again and again; varied prose rarely repeats one."""
    words = policy_text(t).split()
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def script(char: str) -> str:
    """A letter's script: the first word of its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    return unicodedata.name(char, "UNNAMED").split()[0]


def scripts_of(text: str) -> set[str]:
    return {script(c) for c in text if c.isalpha()}


TEMPLATE_SCRIPTS = scripts_of(PROMPT_TEMPLATE)  # the scripts of every prompt's instructions


def foreign_letters(t: Trajectory, scripts: set[str]) -> float:
    """Share of the policy's letters whose script is not in `scripts` (the prompt's); 0 if none."""
    letters = [c for c in policy_text(t) if c.isalpha()]
    return sum(script(c) not in scripts for c in letters) / len(letters) if letters else 0.0


def non_text_chars(t: Trajectory) -> float:
    """Share of the non-whitespace characters that are not text: U+FFFD (bytes that did not
    decode) or Unicode category C* (control, format, private use, unassigned); 0 if none."""
    chars = [c for c in policy_text(t) if not c.isspace()]
    bad = sum(c == "\ufffd" or unicodedata.category(c).startswith("C") for c in chars)
    return bad / len(chars) if chars else 0.0


# ============================================================================ one group, one step
def duplicate_queries(group: list[Trajectory]) -> int:
    """Queries of a group (each time one is issued) that another member of it also issued, compared
    stripped, lowercased, spaces collapsed. A response that repeats only its own query does not
    count: that is a loop, not a group that has stopped exploring."""
    issued = [[" ".join(q.lower().split()) for q in t.queries] for t in group]
    shared = 0
    for i, own in enumerate(issued):
        others = {q for j, theirs in enumerate(issued) if j != i for q in theirs}
        shared += sum(q in others for q in own)
    return shared


def prompt_scripts(prompt_text: str | list[str] | None, n_groups: int) -> list[set[str]]:
    """The scripts each group's prompt uses: the template's and the text given for it (one text
    for every group, or one a question, in order); None = the template alone."""
    texts = prompt_text if isinstance(prompt_text, list) else [prompt_text or ""] * n_groups
    return [TEMPLATE_SCRIPTS | scripts_of(text) for text in texts]


def measure(trajectories: list[Trajectory], group_size: int,
            prompt_text: str | list[str] | None = None) -> list[dict[str, float]]:
    """Each trajectory's measures, trajectories prompt-major (the group_size responses to one
    question adjacent): step_signals averages them, flagged holds them against its thresholds."""
    if not trajectories or len(trajectories) % group_size:
        raise ValueError(f"{len(trajectories)} trajectories do not make groups of {group_size}")
    scripts = prompt_scripts(prompt_text, len(trajectories) // group_size)
    return [{"format_ok": follows_format(t), "broken_tags": broken_tags(t),
             "repeated_4grams": repeated_4grams(t),
             "foreign_letters": foreign_letters(t, scripts[i // group_size]),
             "non_text_chars": non_text_chars(t), "cut_turns": t.cut_turns,
             "invalid_actions": t.invalid_actions}
            for i, t in enumerate(trajectories)]


TEXT_SIGNALS = ("format_ok", "broken_tags", "repeated_4grams", "foreign_letters", "non_text_chars")


def step_signals(trajectories: list[Trajectory], measured: list[dict[str, float]],
                 rewards: list[float], group_size: int) -> dict[str, float]:
    """One step's health signals (DEFINITIONS), trajectories prompt-major and measured (measure).
    Per-turn rates pool the step's turns; the rest are means over trajectories
    (duplicate_queries: over queries)."""
    n, rewards = len(trajectories), [float(r) for r in rewards]
    turns = max(sum(t.n_turns for t in trajectories), 1)
    mean = lambda values: sum(values) / n  # noqa: E731
    signals = {
        **{name: mean(m[name] for m in measured) for name in TEXT_SIGNALS},
        "invalid_per_turn": sum(m["invalid_actions"] for m in measured) / turns,
        "cut_per_turn": sum(m["cut_turns"] for m in measured) / turns,
        "no_search_answers": mean(t.answered and not t.queries for t in trajectories),
        "policy_tokens": mean(sum(t.loss_mask) for t in trajectories),
    }
    if group_size == 1:
        return signals
    starts = range(0, n, group_size)
    groups = [rewards[s: s + group_size] for s in starts]  # (N / G, G)
    queries = max(sum(t.n_searches for t in trajectories), 1)
    signals.update({
        "no_signal_groups": sum(len(set(g)) == 1 for g in groups) / len(groups),
        "all_wrong_groups": sum(all(r == 0 for r in g) for g in groups) / len(groups),
        "all_right_groups": sum(all(r == 1 for r in g) for g in groups) / len(groups),
        "duplicate_queries": sum(duplicate_queries(trajectories[s: s + group_size])
                                 for s in starts) / queries,
    })
    return signals


# ============================================================================ warnings over steps
# The thresholds, to calibrate on real runs. Healthy tiny runs (tiny.py) have format ~1.0, reward
# 0.1 -> 1.0 in 5-20 steps, KL <= ~0.08, entropy falling to ~0.1: no check may fire on them. The
# text checks compare with the run's own best, so a base model that starts untidy warns only
# when it gets worse.
LOOKBACK = 5  # steps back that a "factor" check compares with
WINDOW = 3  # a "fell" or "rose" check reads the median of the newest 3 steps: one odd batch is noise
START_STEPS = 5  # the first steps, whose median is an "x_start" check's reference
STUCK_STEPS = 10  # steps in a row a "stuck" check must hold for: one bad batch is noise
REWARD_SOLVED = 0.9  # a reward this high makes all-equal groups success: they are all right
REMIND_EVERY = 10  # a check that keeps tripping is reported when it trips, then every 10 steps


@dataclass(frozen=True)
class Check:
    signal: str  # the metrics.jsonl column it watches
    rule: str  # fell / rose (against the best so far), above, factor, x_start, stuck (see judge)
    threshold: float
    says: str  # what a trip means: the warning line's second half


CHECKS = [
    # the reasoning first: the collapse shows in the text before the reward (module docstring).
    # Healthy tiny runs dip for a step (to 0.76-0.78, as the policy learns to search) and their
    # 3-step median fell at most 0.15 (PPO, seed 1); the entropy-bonus collapses fell 0.26-0.40
    Check("format_ok", "fell", 0.2, "responses break the tag protocol"),
    # one fragment in four trajectories: a stray one is noise, rows of them the published collapse
    Check("broken_tags", "rose", 0.25, "the policy writes broken tags (<think] and the like)"),
    # healthy text repeats a few % of its 4-grams; a loop repeats most of them
    Check("repeated_4grams", "rose", 0.15, "responses repeat themselves"),
    # a quoted foreign name is well under 1% of the letters; 5% is whole sentences
    Check("foreign_letters", "rose", 0.05, "responses drift into a script the prompt lacks"),
    # healthy decoded text has none: 1% of the characters is bytes that did not make text
    Check("non_text_chars", "rose", 0.01, "responses hold characters that are not text"),
    # healthy runs learn the actions early and keep them; a fifth of the turns is a lost protocol
    Check("invalid_per_turn", "rose", 0.2, "turns end with neither a search nor an answer"),
    Check("cut_per_turn", "rose", 0.2, "turns run out of tokens before an action"),
    # answering from memory can be right for a strong model: only a large swing warns
    Check("no_search_answers", "rose", 0.5, "the agent stopped searching"),
    # healthy tiny runs double it when they learn to search (one turn -> two); collapses run to
    # the budget or to nothing
    Check("policy_tokens", "factor", 3.0, "response length changed fast"),
    # the lagging indicator, still worth a line; a 0.3 fall is no batch-to-batch noise
    Check("reward", "fell", 0.3, "reward fell"),
    # healthy runs stay near 0.02-0.08 at beta = 0.001; 0.5 means the policy has left its base
    Check("kl", "above", 0.5, "the policy moved far from the reference"),
    # PPO's clip at 0.2 touches a few % of tokens in healthy runs
    Check("clip_frac", "above", 0.3, "updates are clipped: the policy moves fast"),
    # entropy falls as a healthy policy sharpens; rising 3x, sampling turns toward gibberish
    Check("entropy", "x_start", 3.0, "sampling grows random (gibberish ahead)"),
    # all-equal groups are success when they are all right (reward ~1); below that, the task is
    # too hard (all wrong) or sampling collapsed (each question answered one way), for 10 steps
    Check("no_signal_groups", "stuck", 0.9, "rewards equal within groups: GRPO learns nothing"),
]
# grad_norm has no check: its scale follows the share of groups with signal (10x within the
# first steps of a healthy tiny run), so no threshold holds across runs without calibration.


def judge(check: Check, points: list[tuple[int, dict]]) -> tuple[float, str] | None:
    """(reference, what it is) when the newest point trips the check, else None.
    points: (step, row) of every step so far whose row holds the signal, the newest last.

        fell     median of the newest WINDOW values < the highest so far - threshold
        rose     median of the newest WINDOW values > the lowest so far + threshold
        above    value > threshold
        factor   value > threshold x its value LOOKBACK steps ago, or < 1 / threshold x it
        x_start  value > threshold x the median of its first START_STEPS values
        stuck    value > threshold for STUCK_STEPS steps in a row, the reward below REWARD_SOLVED
    """
    value = points[-1][1][check.signal]
    earlier = [(s, row[check.signal]) for s, row in points[:-1]]  # (step, value), oldest first
    if not math.isfinite(value):  # a NaN or inf in a logged number: training has diverged
        return math.nan, "not a number"
    if check.rule in ("fell", "rose") and len(earlier) >= WINDOW:
        best = (max if check.rule == "fell" else min)(earlier, key=lambda p: p[1])
        recent = statistics.median([v for _, v in earlier[1 - WINDOW:]] + [value])
        worse = best[1] - recent if check.rule == "fell" else recent - best[1]
        at_best = f"median of the last {WINDOW} steps {recent:.3g}, best {best[1]:.3g} at step {best[0]}"
        return (best[1], at_best) if worse > check.threshold else None
    if check.rule == "above" and value > check.threshold:
        return check.threshold, f"limit {check.threshold:g}"
    if check.rule == "factor" and len(earlier) >= LOOKBACK and earlier[-LOOKBACK][1] > 0:
        was = earlier[-LOOKBACK][1]
        changed = max(value / was, was / max(value, 1e-9)) > check.threshold
        return (was, f"was {was:.3g} {LOOKBACK} steps ago") if changed else None
    if check.rule == "x_start" and len(earlier) >= START_STEPS:
        start = statistics.median(v for _, v in earlier[:START_STEPS])
        median = f"median {start:.3g} of the first {START_STEPS} steps"
        return (start, median) if value > check.threshold * start else None
    if check.rule == "stuck" and len(points) >= STUCK_STEPS:
        recent = [row for _, row in points[-STUCK_STEPS:]]
        stuck = all(row[check.signal] > check.threshold for row in recent)
        reward = recent[-1].get("reward", 0.0)
        held = f"above {check.threshold:g} for {STUCK_STEPS} steps, reward {reward:.3g}"
        return (reward, held) if stuck and reward < REWARD_SOLVED else None
    return None


@dataclass
class HealthWarning:  # not `Warning`, which would hide Python's own
    signal: str
    value: float
    reference: float  # what the value was compared with
    message: str  # one line: signal, value, reference, meaning, where to look


BAR = {"format_ok": "format", "no_signal_groups": "no_signal"}  # signal -> progress-bar label


class Monitor:
    """The run's metrics rows so far; check() says what has gone wrong with the newest one."""

    def __init__(self, past: list[dict] = ()):
        """past: the rows a resumed run logged before (metrics.jsonl), replayed without a word."""
        self.history: list[tuple[int, dict]] = []  # (step, metrics row), oldest first
        self.tripped_at: dict[Check, int] = {}  # check -> the step it started tripping
        for row in past:
            self.check(row, row["step"])

    def check(self, row: dict, step: int) -> list[HealthWarning]:
        """Warnings for this step's row (`step` as metrics.jsonl and samples.jsonl number it)."""
        self.history.append((step, row))
        warnings = []
        for c in CHECKS:
            points = [(s, r) for s, r in self.history if c.signal in r]
            tripped = judge(c, points) if c.signal in row else None
            if tripped is None:
                self.tripped_at.pop(c, None)
                continue
            since = self.tripped_at.setdefault(c, step)
            if (step - since) % REMIND_EVERY == 0:
                reference, words = tripped
                message = (f"{c.signal} {row[c.signal]:.3g} ({words}): {c.says}; "
                           f"see samples.jsonl step {step}")
                warnings.append(HealthWarning(c.signal, row[c.signal], reference, message))
        return warnings

    def bar(self, row: dict) -> dict[str, str]:
        """The progress bar's numbers: format and no-signal share, and the checks tripping."""
        shown = {label: f"{row[name]:.2f}" for name, label in BAR.items() if name in row}
        tripping = [c.signal for c in CHECKS if c in self.tripped_at]
        return shown | ({"warn": ",".join(tripping)} if tripping else {})


# ============================================================================ flagged trajectories
# A trajectory trips one of these when it breaks the protocol at all; repetition and script only
# when they are heavy, since ordinary prose repeats a phrase or quotes a foreign name now and then
HEAVY_REPETITION = 0.5  # half of its 4-grams are repeats
FOREIGN_SHARE = 0.2  # a fifth of its letters in a script the prompt does not use
FLAGGED_PER_CHECK = 4  # at most this many trajectories chosen a step for each check


def trips(m: dict[str, float]) -> list[str]:
    """The per-trajectory checks a trajectory's measures (measure) trip, by name."""
    tripped = {"bad_format": not m["format_ok"], "broken_tags": m["broken_tags"] > 0,
               "repetition": m["repeated_4grams"] >= HEAVY_REPETITION,
               "foreign_letters": m["foreign_letters"] >= FOREIGN_SHARE,
               "non_text_chars": m["non_text_chars"] > 0, "cut_turn": m["cut_turns"] > 0,
               "invalid_action": m["invalid_actions"] > 0}
    return [name for name, hit in tripped.items() if hit]


def flagged(measured: list[dict[str, float]], rewards: list[float],
            group_size: int) -> dict[int, list[str]]:
    """Trajectory index -> every check it trips, for up to FLAGGED_PER_CHECK trajectories a check,
    from the step's measures (measure). Chosen first are those the update reinforces (reward above
    their group's mean: advantage > 0), since broken text that is rewarded is how a collapse
    spreads; then in order."""
    rewards = [float(r) for r in rewards]
    tripped = [trips(m) for m in measured]
    groups = [rewards[s: s + group_size] for s in range(0, len(rewards), group_size)]
    reinforced = [r > sum(groups[i // group_size]) / group_size for i, r in enumerate(rewards)]
    order = sorted(range(len(measured)), key=lambda i: not reinforced[i])  # stable sort
    chosen = set()
    for name in {name for names in tripped for name in names}:
        tripping = [i for i in order if name in tripped[i]]
        chosen.update(tripping[:FLAGGED_PER_CHECK])
    return {i: tripped[i] for i in sorted(chosen)}
