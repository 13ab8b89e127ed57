"""Chapter 2 — the rollout: a policy that thinks, searches, reads and answers,
one batch at a time.

Search-R1 trains on trajectories made like this (docs/reference.md):

    prompt -> the model samples a turn: <think> ... </think> <search> query </search>
           -> the search engine answers: <information> Doc 1(...) ... </information>
           -> the model samples the next turn ... <answer> final answer </answer>

`rollout()` is that loop, top to bottom: the policy writes a turn (`_CachedDecoder.sample_turn`),
the environment answers it (`act`), until every trajectory has answered or used its turns. A turn
ends when its text contains `</search>` or `</answer>`, at EOS, or after `max_new_tokens`. The first
`<search>q</search>` or `<answer>a</answer>` in the turn is its action; neither is an invalid
action, answered by a fixed message. After `max_turns` turns comes one last turn whose search is not
run.

What a trajectory keeps, and the masks
    response_ids  every token after the prompt: sampled turns and observations, interleaved.
    loss_mask     1 = a token the policy sampled and is trained on; 0 = an observation token
                  (retrieved passages or the invalid-action message). The paper's "retrieved-token
                  masking".
    logprobs      log pi(token) under the full softmax(logits / T) at sampled positions, 0.0 at
                  observations: what the sampler saw. Training recomputes pi_old in its own pass, as
                  the reference does, unless --old-logprobs rollout makes it use these (a test
                  checks they equal that pass in float32).
The sampled tokens are kept exactly as sampled. Stop strings are found in the text of the newest
tokens -- they can span tokens or end inside one (Qwen writes "query</search>\\n" as `query`,`</`,
`search`,`>\\n`) -- and the turn is cut right after the token that completes them; text is never
re-tokenized, so each log-prob belongs to the very token that will be trained.

`rollout_plain()` is the same loop on `model.generate`, short and slow; the engine at the bottom of
the file (`_CachedDecoder`) only makes `rollout()` fast and can be skipped on a first read.

Where this departs from the paper's code, and why
    - The paper's engine (vLLM in veRL) starts generation again every turn and prefills the whole
      history; here one cache is continued (1.8x the tokens/s of re-prefilling with model.generate
      on the CPU at equal turn lengths, 2.6x when they differ: `python bench.py rollout`,
      docs/gpu.md).
    - The paper decodes the responses and tokenizes the text again; here the sampled tokens are kept
      as they are. So an EOS that ends a turn without an action stays in the response (and is
      trained on, loss_mask 1) before the invalid-action message, where the paper's decode drops it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer

from eval import clean_question

PROMPT_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can "
    "call a search engine by <search> query </search> and it will return the top searched results "
    "between <information> and </information>. You can search as many times as your want. If you "
    "find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)
STOP_STRINGS = ("</search>", "</answer>")
ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> "
    "and </answer>. Let me try again.\n"
)
# Every token a stop string spans holds at least one of its characters, so the last `_TAIL` tokens
# of a turn contain any stop string that the newest token completes.
_TAIL = max(len(s) for s in STOP_STRINGS)


def build_prompt(question: str, tokenizer, chat: bool) -> list[int]:
    """Token ids of Search-R1's prompt for a question: plain text, or (chat) the user message of the
    tokenizer's chat template, as the reference sends it whenever the tokenizer has one."""
    return encode_prompt(PROMPT_TEMPLATE.format(question=clean_question(question)), tokenizer, chat)


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, or 0 where it has none (Llama 3).
    Padding is always masked out, so any valid id serves."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_prompt(text: str, tokenizer, chat: bool) -> list[int]:
    """A prompt's token ids: the text as is (base models), or as the user message of the chat
    template."""
    if not chat:
        return tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the template already holds any BOS
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class RolloutConfig:  # built by searchr1.Config.rollout_config(), where each default lives
    max_turns: int  # turns whose search is run; then one last turn that runs none
    max_new_tokens: int  # tokens sampled per turn at most (the paper's per-turn budget)
    max_obs_tokens: int  # tokens of an observation kept, the rest cut (the paper's max_obs_length)
    temperature: float  # softmax temperature; 0 = greedy (evaluation)
    top_p: float  # nucleus sampling mass; 1.0 = off
    n_samples: int  # trajectories per prompt (the GRPO group size)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    # sampled and observation tokens, interleaved
    response_ids: list[int] = field(default_factory=list)
    # 1 = sampled by the policy, trained on; 0 = observation
    loss_mask: list[int] = field(default_factory=list)
    # log pi(token) at sampled positions; 0.0 at observations
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decode of response_ids
    queries: list[str] = field(default_factory=list)  # the searches that were run, in order
    # the text of each sampled turn, as the policy wrote it
    turns: list[str] = field(default_factory=list)
    answered: bool = False  # the trajectory ended with an <answer> action
    invalid_actions: int = 0  # turns answered by INVALID_ACTION: neither a search nor an answer
    cut_turns: int = 0  # turns that used the whole token budget without writing an action

    @property
    def n_searches(self) -> int:
        return len(self.queries)

    @property
    def n_turns(self) -> int:  # turns sampled, the last one included
        return len(self.turns)


def parse_action(text: str) -> tuple[str | None, str]:
    """('search' | 'answer', stripped content) of the first action in a turn's text,
    or (None, '')."""
    m = ACTION.search(text)
    return (m.group(1), m.group(2).strip()) if m else (None, "")


def observation(passages: str) -> str:
    """The observation that follows a search: the passages between <information> tags, blank lines
    around."""
    return f"\n\n<information>{passages.strip()}</information>\n\n"


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a turn: the tokenizer's EOS and the model's (Qwen's instruct models have
    two)."""
    # None, an id or a list
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {tokenizer.eos_token_id,
            *(model_eos if isinstance(model_eos, list) else [model_eos])} - {None}


def turn_ends(tokenizer, eos: set[int], budget: int) -> Callable[[list[list[int]]], list[bool]]:
    """turn_over(turns) -> for each turn's sampled ids so far: is that turn over? At EOS, at the
    token budget, or at the token that completes a stop string, found in the text of the turn's last
    tokens.

    That text is each token's own text, looked up in a table filled as tokens first appear, not the
    tokenizer's decode of every row's tail at every step (host work that weighs more on a GPU, where
    the forward is cheap). The stop strings are ASCII, and in a byte-level BPE an ASCII character
    reads the same in a token decoded alone as in context, so both find the same stop strings.
    """
    text_of: dict[int, str] = {}  # token id -> its text, decoded alone

    def tail_text(ids: list[int]) -> str:
        for i in ids:
            if i not in text_of:
                text_of[i] = tokenizer.decode([i])
        return "".join(text_of[i] for i in ids)

    def turn_over(turns: list[list[int]]) -> list[bool]:
        return [ids[-1] in eos or len(ids) == budget
                or any(stop in tail_text(ids[-_TAIL:]) for stop in STOP_STRINGS)
                for ids in turns]
    return turn_over


# ============================================================================ the Search-R1 loop
@torch.inference_mode()
def rollout(
    model,
    tokenizer,
    prompts: list[list[int]],
    search: Callable[[list[str]], list[str]],
    cfg: RolloutConfig,
    logits_hook: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[Trajectory]:
    """Sample cfg.n_samples trajectories per prompt, prompt-major (all samples of prompt 0 first).

    search: a batch of queries -> per query the formatted passages
        ("Doc 1(Title: ...) ...\nDoc 2(..."); how many passages (top-k) is its choice. Called once
        per turn with every query of that turn.
    logits_hook(logits (A, V), rows (A,), turn, step) -> logits: for tests and benchmarks, changes
        what is sampled (rows = trajectory indices, step = tokens already sampled this turn); the
        log-probs recorded stay the model's own.
    generator: a torch.Generator on the model's device makes sampling reproducible; None uses the
        global RNG.
    The model runs in eval mode (no dropout) on its own device and dtype, and gets its mode back
    after.
    """
    trajs = [Trajectory(prompt_ids=list(p)) for p in prompts for _ in range(cfg.n_samples)]
    if any(not t.prompt_ids for t in trajs):
        raise ValueError("rollout: every prompt needs at least one token")
    was_training = model.training
    # no dropout while sampling; gradient checkpointing would also switch the cache off
    model.eval()
    decoder = _CachedDecoder(model, pad_id(tokenizer), cfg, len(trajs), max(map(len, prompts)),
                             logits_hook, generator)
    turn_over = turn_ends(tokenizer, eos_ids(model, tokenizer), cfg.max_new_tokens)
    # row -> tokens the model has not read
    unread = {r: list(t.prompt_ids) for r, t in enumerate(trajs)}
    for turn in range(cfg.max_turns + 1):
        if not unread:
            break
        # the policy writes: every row samples until its turn is over
        sampled = decoder.sample_turn(unread, turn, turn_over)  # row -> (ids, log-probs)
        # the environment answers: searches run, invalid actions are told so; answers end a
        # trajectory
        observations = act(trajs, sampled, turn, search, tokenizer, cfg)
        # a row that goes on has its turn's last token still to read, then its observation
        unread = {r: [sampled[r][0][-1]] + obs for r, obs in observations.items()}
    model.train(was_training)
    for t in trajs:
        t.text = tokenizer.decode(t.response_ids)
    return trajs


def act(trajs, sampled: dict, turn: int, search, tokenizer,
        cfg: RolloutConfig) -> dict[int, list[int]]:
    """The environment's side of a turn: record what each row sampled (loss_mask 1) and answer its
    action. An answer ends the trajectory, and so does the last turn (max_turns turns search; the
    one after them runs no search). Every search of the turn goes to the engine in one call, and its
    passages are appended as an observation (loss_mask 0); an invalid action is answered by
    INVALID_ACTION. Returns, for each row that goes on, its observation's token ids."""
    observations, searching = {}, []
    for r, (ids, logprobs) in sampled.items():
        t = trajs[r]
        t.response_ids += ids
        t.loss_mask += [1] * len(ids)
        t.logprobs += logprobs
        text = tokenizer.decode(ids)
        kind, content = parse_action(text)
        t.turns.append(text)
        t.answered = kind == "answer"
        t.cut_turns += kind is None and len(ids) == cfg.max_new_tokens
        if kind == "answer" or turn == cfg.max_turns:
            continue
        observations[r] = INVALID_ACTION  # until its search's passages replace it
        if kind == "search":
            searching.append(r)
            t.queries.append(content)
        else:
            t.invalid_actions += 1
    if searching:
        results = search([trajs[r].queries[-1] for r in searching])
        if len(results) != len(searching):
            raise ValueError(f"search returned {len(results)} results for {len(searching)} queries")
        observations.update({r: observation(passages) for r, passages in zip(searching, results)})
    for r, text in observations.items():
        observations[r] = tokenizer(text,
                                    add_special_tokens=False)["input_ids"][: cfg.max_obs_tokens]
        trajs[r].response_ids += observations[r]
        trajs[r].loss_mask += [0] * len(observations[r])
        trajs[r].logprobs += [0.0] * len(observations[r])
    return observations


# ============================================================================ the plain rollout
@torch.inference_mode()
def rollout_plain(model, tokenizer, prompts, search, cfg: RolloutConfig,
                  logits_hook=None) -> list[Trajectory]:
    """The same Search-R1 loop with model.generate re-run over each whole history every turn, as an
    engine that restarts each turn does: short and slow. It makes the trajectories rollout() makes
    (under greedy decoding, token for token: a test), and is the benchmark's baseline."""
    device = next(model.parameters()).device
    trajs = [Trajectory(prompt_ids=list(p)) for p in prompts for _ in range(cfg.n_samples)]
    eos, pad = eos_ids(model, tokenizer), pad_id(tokenizer)
    turn_over = turn_ends(tokenizer, eos, cfg.max_new_tokens)
    t = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy records log-probs at temperature 1
    sampling = (dict(do_sample=True, temperature=t, top_p=cfg.top_p, top_k=0)
                if cfg.temperature > 0 else {})
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                           eos_token_id=sorted(eos), stop_strings=list(STOP_STRINGS),
                           return_dict_in_generate=True, output_logits=True,
                           **(sampling or dict(do_sample=False)))
    going, was_training = list(range(len(trajs))), model.training
    model.eval()
    for turn in range(cfg.max_turns + 1):
        if not going:
            break
        ids, mask = _left_pad([trajs[r].prompt_ids + trajs[r].response_ids for r in going],
                              pad, device)
        hook = ([_Hook(logits_hook, torch.tensor(going, device=device), turn, ids.shape[1])]
                if logits_hook else [])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             tokenizer=tokenizer, logits_processor=LogitsProcessorList(hook))
        new = out.sequences[:, ids.shape[1]:]                                      # (A, steps)
        # a finished row's padding may be no model token
        taken = new.clamp(max=out.logits[0].shape[-1] - 1)
        # (A, steps), full softmax
        logp = torch.stack([torch.log_softmax(logits.float() / t, -1)
                            .gather(1, taken[:, k: k + 1]).squeeze(1)
                            for k, logits in enumerate(out.logits)], 1).tolist()
        sampled = {}
        for i, r in enumerate(going):
            row = new[i].tolist()
            # where its turn is over
            n = next(k for k in range(1, len(row) + 1) if turn_over([row[:k]])[0])
            sampled[r] = row[:n], logp[i][:n]
        going = list(act(trajs, sampled, turn, search, tokenizer, cfg))
    model.train(was_training)
    for traj in trajs:
        traj.text = tokenizer.decode(traj.response_ids)
    return trajs


class _Hook(LogitsProcessor):
    """rollout's logits_hook(logits, rows, turn, step) as a model.generate logits processor."""

    def __init__(self, hook, rows, turn, start):
        self.hook, self.rows, self.turn, self.start = hook, rows, turn, start

    # a copy: generate keeps `scores` as the step's raw logits
    def __call__(self, input_ids, scores):
        return self.hook(scores.clone(), self.rows, self.turn, input_ids.shape[1] - self.start)


# ============================================================================ the engine
# (you may skip this)
# How rollout() samples fast: a hand-written decode loop over one KV cache that lives across turns.
# Nothing here is Search-R1; it only changes the speed (python bench.py rollout), never the tokens.
#
# One batch holds the rows of a turn, left-padded. A step is one forward of one token per row and
# one sample; only that step's logits (A, V) ever exist. Every row's keys and values live in one
# buffer allocated once per rollout, for the longest trajectory the budgets allow (`_RolloutCache`),
# so a step writes its keys and values in place instead of copying the whole cache (Hugging Face's
# DynamicCache concatenates), and the cache is never copied out and back between turns: its memory
# is exactly what plan.py counts, rows x (prompt + response budget) x kv bytes, once. `mask` marks
# the slots that hold real tokens (1); a token's position id is the number of real tokens before it,
# so padding and the slots a row skipped while others sampled change no result.
# A row whose turn is over leaves the batch at once: it swaps places with a row still sampling from
# the end of the batch (`_permute`), and the batch's forward covers the first n rows only, so
# finished rows cost no compute. The next turn brings the rows that go on to the front, in the order
# their turns ended, and runs only their unread tokens (the last sampled token and the observation)
# through the model: the prefix is never computed twice.

# transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns from then
# and goes in 5.40; before 5.24 the new one is swallowed by **kwargs and the cache stays empty)
def cache_keyword(version: str) -> str:
    """By release numbers: a 5.24 pre-release (5.24.0.dev0, which sorts before 5.24) has the new name."""
    return "cache" if Version(version).release >= (5, 24) else "past_key_values"


CACHE_KEYWORD = cache_keyword(transformers.__version__)


class _CachedDecoder:
    """Samples turn after turn for the rows of one rollout, over one KV cache that lives across
    turns."""

    def __init__(self, model, pad: int, cfg: RolloutConfig, rows: int, prompt_len: int,
                 logits_hook, generator):
        self.model, self.pad, self.cfg, self.logits_hook, self.generator = (
            model, pad, cfg, logits_hook, generator)
        self.device = next(model.parameters()).device
        # the longest trajectory: the prompt, every turn's tokens, every observation after a
        # search turn
        capacity = (prompt_len + (cfg.max_turns + 1) * cfg.max_new_tokens
                    + cfg.max_turns * cfg.max_obs_tokens)
        self.cache = _RolloutCache(model.config.get_text_config().num_hidden_layers, rows, capacity)
        # 1 = a real token's slot
        self.mask = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
        self.row_of = list(range(rows))  # buffer row -> the trajectory it holds

    def sample_turn(self, unread: dict[int, list[int]], turn: int, turn_over) -> dict:
        """Rows `unread` (row -> tokens the model has not read) sample one turn each; returns row ->
        (sampled ids, their log-probs), rows in the order their turns ended (the next turn's batch
        order)."""
        # the batch, in order: buffer rows 0 .. A-1 are made to hold these rows
        active = list(unread)
        where = {r: a for a, r in enumerate(self.row_of)}
        order = active + [r for r in self.row_of if r not in unread]
        self._permute([where[r] for r in order])
        ids, ids_mask = _left_pad([unread[r] for r in active], self.pad, self.device)  # (A, P)
        logits = self._forward(ids, ids_mask)
        sampled, finished, step = {r: ([], []) for r in active}, {}, 0
        while True:
            rows = torch.tensor(active, device=self.device) if self.logits_hook else None
            steer = (lambda x: self.logits_hook(x, rows, turn, step)) if self.logits_hook else None
            tokens, logp = _sample(logits, self.cfg, self.generator, steer)  # (A,), (A,)
            for r, y, lp in zip(active, tokens.tolist(), logp.tolist()):
                sampled[r][0].append(y)
                sampled[r][1].append(lp)
            done = turn_over([sampled[r][0] for r in active])
            finished.update((r, sampled[r]) for a, r in enumerate(active) if done[a])
            if all(done):
                return finished
            # compact: rows still sampling from the end of the batch swap into the holes
            if any(done):
                n = len(done) - sum(done)
                tail = [a for a in range(n, len(done)) if not done[a]]
                # batch row a <- row keep[a]
                keep = [tail.pop() if done[a] else a for a in range(n)]
                source = list(range(len(self.row_of)))
                for a, b in enumerate(keep):
                    source[a], source[b] = b, a
                self._permute(source)
                tokens, active = tokens[keep], [active[a] for a in keep]
            step += 1
            logits = self._forward(tokens[:, None], torch.ones_like(tokens)[:, None])

    def _forward(self, ids, ids_mask):
        """Run new tokens `ids` (A, P) on top of the first A rows' cache: next-token logits (A, V)
        in fp32."""
        A, P = ids.shape
        start = self.cache.length
        self.mask[:A, start: start + P] = ids_mask
        mask = self.mask[:A, : start + P]  # (A, L + P), 1 = real token
        positions = (mask.cumsum(1)[:, -P:] - 1).clamp(min=0)  # position = real tokens before it
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         # the last position's logits only
                         logits_to_keep=1, **{CACHE_KEYWORD: self.cache})
        self.cache.length = start + P
        return out.logits[:, -1].float()

    def _permute(self, source: list[int]) -> None:
        """Buffer row a takes what row source[a] held (a permutation), one row at a time along each
        cycle, so the only copy ever made is of one row: the cache is never held twice."""
        placed = [a == s for a, s in enumerate(source)]
        for start in range(len(source)):
            if placed[start]:
                continue
            held, a = self._row(start), start  # the first row of the cycle to be overwritten
            while source[a] != start:
                self._move_row(a, source[a])
                placed[a], a = True, source[a]
            self._set_row(a, held)
            placed[a] = True
        self.row_of = [self.row_of[s] for s in source]

    def _row(self, a: int):  # a copy of buffer row a: its filled slots in every layer, and its mask
        filled = self.cache.length
        return self.cache.kv[:, :, a, :, :filled].clone(), self.mask[a, :filled].clone()

    def _set_row(self, a: int, row) -> None:
        kv, mask = row
        self.cache.kv[:, :, a, :, : kv.shape[-2]] = kv
        self.mask[a, : mask.shape[0]] = mask

    def _move_row(self, a: int, b: int) -> None:  # buffer row a <- row b, copied in place
        filled = self.cache.length
        self.cache.kv[:, :, a, :, :filled] = self.cache.kv[:, :, b, :, :filled]
        self.mask[a, :filled] = self.mask[b, :filled]


class _RolloutCache(Cache):
    """Keys and values of every layer and row of a rollout in one buffer, allocated once:
    kv (2, layers, rows, kv heads, capacity, head dim), 0 = keys, 1 = values. The first `length`
    slots are filled; a forward over A rows reads and writes rows 0 .. A-1 (each layer a
    `_Slab`)."""

    def __init__(self, layers: int, rows: int, capacity: int):
        super().__init__(layers=[_Slab(self, layer) for layer in range(layers)])
        self.shape, self.kv, self.length = (layers, rows, capacity), None, 0

    # heads, head size and dtype from the model's own keys
    def allocate(self, keys: torch.Tensor) -> None:
        layers, rows, capacity = self.shape
        # zeros, not empty: unfilled slots are masked out, but 0 x NaN garbage would still be NaN
        self.kv = keys.new_zeros(2, layers, rows, keys.shape[-3], capacity, keys.shape[-1])


class _Slab(DynamicLayer):
    """One layer's view of the rollout's buffer: `keys`/`values` are the filled slots of the batch's
    rows."""

    def __init__(self, cache: _RolloutCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer

    def update(self, key_states, value_states, *args, **kwargs):
        if self.cache.kv is None:
            self.cache.allocate(key_states)
        rows, start = key_states.shape[0], self.cache.length
        end = start + key_states.shape[-2]
        # views
        keys, values = self.cache.kv[0, self.layer, :rows], self.cache.kv[1, self.layer, :rows]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.keys, self.values, self.is_initialized = keys[:, :, :end], values[:, :, :end], True
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cache.length


def _left_pad(seqs, pad, device):
    """Sequences of different lengths as ids (A, P) padded on the left, and their mask (A, P),
    1 = real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    real = torch.zeros_like(ids)
    for a, s in enumerate(seqs):
        ids[a, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        real[a, width - len(s) :] = 1
    return ids.to(device), real.to(device)


def _sample(logits, cfg, generator, steer):
    """One token per row from logits (A, V); returns tokens (A,) and their log-probs (A,)."""
    t = cfg.temperature if cfg.temperature > 0 else 1.0  # greedy records log-probs at temperature 1
    log_z = torch.logsumexp(logits / t, dim=-1)  # (A,)  log sum_v exp(z_v / T)
    # a hook may force tokens; log-probs stay the model's
    chosen = steer(logits.clone()) if steer else logits
    if cfg.temperature == 0:
        tokens = chosen.argmax(-1)
    else:
        probs, order = torch.softmax(chosen / t, dim=-1), None
        if cfg.top_p < 1.0:  # nucleus: keep the most likely tokens until their mass reaches top_p
            probs, order = probs.sort(dim=-1, descending=True)
            probs[probs.cumsum(-1) - probs > cfg.top_p] = 0.0
        # inverse-CDF draw: u ~ U(0, total mass), the first token whose cumulative mass exceeds u
        # (torch.multinomial draws an exponential variate per vocabulary entry: ~10x slower
        # on the CPU)
        cdf = probs.cumsum(-1)  # (A, V)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(1)
        if order is not None:
            tokens = order.gather(1, tokens[:, None]).squeeze(1)
    logp = logits.gather(1, tokens[:, None]).squeeze(1) / t - log_z  # log pi(y) = z_y / T - log Z
    return tokens, logp
