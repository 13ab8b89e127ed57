"""A tiny Search-R1 you can train on a CPU: proof that rollout, reward and GRPO (or PPO) add up to learning.

The other chapters' tests show that each piece does what it says; they cannot show that the
pieces together teach a model to search. This chapter builds a task in which searching is the only
way to answer, small enough that all of Search-R1 runs on two CPU cores in about two minutes
(`python searchr1.py --model tiny`):

    knowledge base  400 invented entities ("Bavoki", "Tuzel") x 3 attributes (color, city, food),
                    10 values each; one passage per fact, written as a Search-R1 corpus, indexed by
                    retriever.py; questions ("What is the color of Bavoki?") in FlashRAG JSONL
    held out        200 facts (entity, attribute) that no training question asks. Their entities
                    are asked about in training (other attributes): a model cannot copy into a
                    query a name whose token embedding it never trained
    tokenizer       byte-level BPE in Qwen2.5's format, trained on every text of the task until
                    each word is one token (~1,900 tokens), saved in Hugging Face format
    policy          Qwen2 architecture, 2 layers of width 128, tied embeddings: 0.64M parameters
    warm-up         a short supervised stage that stands in for pretraining: the model learns the
                    tags, to search and to read the answer out of the passage -- but it is shown
                    more guesses than searches, so its greedy policy guesses: EM near chance (0.1)
    GRPO            searchr1.train() with the warm-up folder as --model: the same rollout, reward,
                    loss and LoRA as for Qwen2.5-3B
    PPO             the same with --algo ppo: one response to each of 80 questions a step (the
                    same 80 trajectories as GRPO's 16 x 5), a critic as the baseline

The multi-hop task (`python searchr1.py --model tiny-multihop`, TASKS below) asks questions that
need two lookups chained, the second made with what the first returned:

    knowledge base  the entities live in 100 invented cities ("The city of Bavoki is Zorlan.") and
                    the cities have facts (sport, tree, bird: "The sport of Zorlan is polo."). "What
                    is the sport of the city of Bavoki?" needs Bavoki's passage, then Zorlan's
    held out        one fact of each city: no training question looks it up, directly or through an
                    entity, so neither the weights nor one search can answer the questions that
                    chain to it (tested); the city's name is trained through its other facts
    warm-up         teaches every single lookup (each entity's city, each city's other facts) and
                    shows the two-hop questions mostly as one search and a guess, a fifth of them
                    (half in the first phase) as the whole chain: greedy, it searches once and guesses
    RL              must teach the second search: --max-turns 2, the reference's, allows it

A guess is right one time in ten; an answer read from the retrieved passage nearly always. Within a
group of responses to one question the searching ones score higher, so the group advantage
(r - mean) / std moves probability onto searching -- that decision is what GRPO has to learn.
PPO has no group: its critic learns the expected reward, and a response that searched and scored
beats that expectation.

Warm-up trajectories are laid out as the rollout lays out sampled ones: the query runs against the
real BM25 index, the observation is rollout.observation() of its passages, and the loss covers only
the tokens the policy writes (observation tokens masked), as in RL.

Where this departs from Search-R1:
- The "pretrained" model is made here by a supervised warm-up on scripted trajectories: nothing can
  be downloaded offline, and a random model never writes a tag, so RL would never see a reward.
- One sentence per fact and top-1 retrieval (searchr1's TINY settings): the task is deciding to
  search, not reading Wikipedia. The fact's passage always ranks first for its query (tested);
  three passages would only lengthen every sequence.
- Short per-turn budgets: the scripted turns are ~15 tokens, not 500.
"""
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from retriever import BM25Index, format_passages
from rollout import CACHE_KEYWORD, INVALID_ACTION, PROMPT_TEMPLATE, build_prompt, observation
from runs import write_atomic

# Every fact is (subject, attribute, value): an entity's, each attribute with its own 10 values
VALUES = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "gray"],
    "city": ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Rome", "Quito", "Dakar", "Hanoi"],
    "food": ["rice", "bread", "fish", "apples", "beans", "honey", "cheese", "nuts", "corn", "soup"],
}
# The multi-hop task (hops = 2): entities live in invented cities, which have facts of their own (10
# values each); a question about an entity's city needs two lookups, the city, then its fact
CITY_VALUES = {
    "sport": ["chess", "golf", "tennis", "rugby", "hockey", "polo", "judo", "boxing", "rowing", "skiing"],
    "tree": ["oak", "pine", "birch", "maple", "cedar", "palm", "elm", "willow", "ash", "fir"],
    "bird": ["owl", "crow", "swan", "hawk", "duck", "eagle", "heron", "robin", "parrot", "finch"],
}
ALL_VALUES = VALUES | CITY_VALUES
QUESTION = "What is the {attribute} of {subject}?"
TWO_HOP_QUESTION = "What is the {attribute} of the city of {subject}?"
PASSAGE = "The {attribute} of {subject} is {value}."  # under the title "{subject}"
# What the policy writes in the warm-up's scripts: a search turn for each lookup it makes (its
# observation follows), then an answer turn that reads the last passage or guesses the next lookup
QUERY = "{subject} {attribute}"
SEARCH = "<think> {read}I need the {attribute} of {subject}. </think> <search> " + QUERY + " </search>"
READ = "<think> {read}</think> <answer> {value} </answer>"
GUESS = "<think> {read}I know the {attribute} of {subject}. </think> <answer> {value} </answer>"
SAID = "The {attribute} of {subject} is {value}. "  # {read}: what the last passage said, or nothing
TAGS = ["<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
        "<answer>", "</answer>"]
EOS = "<|endoftext|>"


@dataclass
class TinyTask:
    """Size of the task and of its warm-up; the defaults make `--model tiny` (a few minutes)."""
    hops: int = 1                  # lookups a question needs: 1, or 2 (`--model tiny-multihop`)
    entities: int = 400            # x 3 attributes = 1,200 facts, one passage each
    cities: int = 100              # hops 2: invented cities (x 3 facts) the entities live in
    held_out: int = 200            # questions asked only in evaluation (at most one per entity)
    warmup_steps: int = 600        # supervised steps of warmup_batch trajectories, in all
    short_steps: int = 250         # the first of them: question-only prompts, mostly searching
    skill_share: float = 0.7       # trajectories making every lookup in those first steps: learn the skill
    search_share: float = 0.3      # ... afterwards: greedy decoding guesses (the last lookup)
    warmup_batch: int = 32
    warmup_lr: float = 1e-3        # AdamW; 3e-3 stalls at loss ~1 (measured)
    hidden: int = 128              # Qwen2 width; 4 heads, 2 KV heads, MLP 3 x hidden
    layers: int = 2                # 2 layers leave the copy plateau ~2x sooner than 4 (measured)
    seed: int = 0


# The tasks `--model` names: one lookup a question, or two chained ones. Multi-hop (measured, docs/tiny.md):
# with 10 cities their facts were memorised instead of read; with 10% of the two-hop warm-up chaining
# (30% first) sampling found the second search only at step 19, with 5% never
TASKS = {"tiny": TinyTask(),
         "tiny-multihop": TinyTask(hops=2, entities=200, held_out=200, warmup_steps=800, short_steps=300,
                                   skill_share=0.5, search_share=0.2)}


# ----------------------------------------------------------------------------- knowledge base
def invent_names(rng: random.Random, n: int) -> list[str]:
    """n distinct made-up words of two or three syllables ('Bavoki', 'Tuzel', ...), none of them a
    word the task uses otherwise: BM25 would confuse an entity named 'Rome' with the city."""
    taken = " ".join([PROMPT_TEMPLATE, INVALID_ACTION, QUESTION, TWO_HOP_QUESTION, PASSAGE, SEARCH, READ,
                      GUESS, *ALL_VALUES, *(value for values in ALL_VALUES.values() for value in values)])
    taken = set(re.findall(r"[a-z]+", taken.lower()))
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "", "", "l", "n", "r", "s"]
    names = set()
    while len(names) < n:
        syllables = [rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice([2, 2, 3]))]
        name = "".join(syllables) + rng.choice(codas)
        if name not in taken:
            names.add(name.capitalize())
    return sorted(names)


def make_knowledge_base(task: TinyTask) -> tuple[list[dict], list[dict], list[dict]]:
    """(corpus passages, training questions, held-out questions), all from task.seed.

    Each entity has one value per attribute (VALUES); each fact is one passage titled by its subject.
    A question's "lookups" are the facts that answer it, in the order they must be looked up.
    hops 1: one question per fact; one fact each of the first `held_out` entities is the evaluation.
    hops 2: each entity's city is one of `cities` invented ones, which have facts too (CITY_VALUES),
    and each entity x city attribute is a question of two lookups ("What is the sport of the city
    of Bavoki?": Bavoki's city, then that city's sport). One fact of each city is held out: no
    training question looks it up, so no weights can hold it and one search cannot answer. The questions that chain to it (one per
    entity) are the evaluation, for the first `held_out` entities. Training asks the other two-hop
    questions and, for the warm-up, the single lookups (each entity's city, each city's other facts).
    """
    if task.held_out > task.entities:
        raise ValueError(f"held_out ({task.held_out}) must not exceed entities ({task.entities}): "
                         "at most one question per entity is held out")
    if task.hops not in (1, 2):
        raise ValueError(f"hops ({task.hops}) must be 1 or 2")
    rng = random.Random(task.seed)
    cities = task.cities if task.hops == 2 else 0
    names = invent_names(rng, task.entities + cities)
    rng.shuffle(names)
    entities, cities = names[: task.entities], names[task.entities:]
    if task.hops == 1:  # (entity, attribute) facts held out
        held_out = {(entity, rng.choice(list(VALUES))) for entity in entities[: task.held_out]}
    else:               # (city, attribute) facts held out
        held_out = {(city, rng.choice(list(CITY_VALUES))) for city in cities}
    facts = {}  # (subject, attribute) -> value
    subjects = [(entity, VALUES | ({"city": cities} if cities else {})) for entity in entities]
    subjects += [(city, CITY_VALUES) for city in cities]
    corpus = []
    for subject, attributes in subjects:
        for attribute, values in attributes.items():
            fact = {"subject": subject, "attribute": attribute, "value": rng.choice(values)}
            facts[subject, attribute] = fact["value"]
            corpus.append({"id": str(len(corpus)), "contents": f'"{subject}"\n' + PASSAGE.format(**fact)})

    def question(template, subject, attribute, *lookups):
        return {"id": f"{attribute}-{len(lookups)}-{subject}", "golden_answers": [lookups[-1][2]],
                "question": template.format(subject=subject, attribute=attribute), "lookups": list(lookups)}

    train, test = [], []
    for entity in entities:
        if task.hops == 1:
            for attribute in VALUES:
                q = question(QUESTION, entity, attribute, [entity, attribute, facts[entity, attribute]])
                (test if (entity, attribute) in held_out else train).append(q)
            continue
        city = facts[entity, "city"]
        for attribute in CITY_VALUES:
            q = question(TWO_HOP_QUESTION, entity, attribute,
                         [entity, "city", city], [city, attribute, facts[city, attribute]])
            if (city, attribute) not in held_out:
                train.append(q)
            elif len(test) < task.held_out:  # one such question per entity
                test.append(q)
    if task.hops == 2:  # the single lookups, taught in the warm-up
        train += [question(QUESTION, subject, attribute, [subject, attribute, value])
                  for (subject, attribute), value in facts.items()
                  if attribute in ("city", *CITY_VALUES) and (subject, attribute) not in held_out]
    rng.shuffle(train)
    return corpus, train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------- tokenizer
def vocabulary_texts(questions: list[dict], search) -> list[str]:
    """Every text the model is shown or taught to write: prompts, scripted turns, observations."""
    texts = [INVALID_ACTION]
    for q in questions:
        texts.append(PROMPT_TEMPLATE.format(question=q["question"]))
        for text, query in script(q, len(q["lookups"])):
            texts += [text] + ([observation(search([query])[0])] if query else [])
        guesses = range(len(q["lookups"]))  # answer turns that stop short (any value of the attribute)
        texts += [script(q, searches, guess=q["golden_answers"][0])[-1][0] for searches in guesses]
    return texts


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer in Qwen2's format, trained until every word of `texts` is one token.

    Qwen2.5's own recipe -- NFC, its pre-tokenizing regex, bytes as the alphabet, BPE merges -- with
    a vocabulary of a few thousand instead of 151k: merging runs until no pair of symbols is left,
    so ' Bavoki' and ' color' are single tokens and the model copies a name as one token. Saved
    next to a Qwen2 model, it loads back as Qwen2Tokenizer (transformers picks the class from the
    model type), so this is the form it must have. decode(encode(text)) == text for any text; the
    tags are added tokens, matched before pre-tokenizing, and not special: decoding keeps them.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False,
                                  special_tokens=[EOS] + TAGS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]])
    tokenizer.add_tokens(TAGS)  # EOS (<|endoftext|>) is also the padding, as in Qwen2.5
    return tokenizer


def tiny_qwen2(tokenizer, task: TinyTask):
    """A Qwen2 causal LM with random weights: task.layers layers of width task.hidden, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(task.seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=task.hidden,
                         intermediate_size=3 * task.hidden, num_hidden_layers=task.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config)


# ----------------------------------------------------------------------------- warm-up
def lookup_fields(lookup: list) -> dict:
    """A question's lookup [subject, attribute, value] as the fields PASSAGE, QUERY and the turns name."""
    return dict(zip(("subject", "attribute", "value"), lookup))


def script(q: dict, searches: int, guess: str = "") -> list[tuple[str, str | None]]:
    """The turns the policy writes for question q when it makes the first `searches` of its lookups:
    [(turn text, the query it runs or None)]. A search turn per lookup made (each after the first
    repeats what the last passage said), then the answer turn: when every lookup was made, it reads
    the answer out of the last passage; otherwise it says it knows the next lookup and answers `guess`.

        search 1    <think> I need the city of Bavoki. </think> <search> Bavoki city </search>
        search 2    <think> The city of Bavoki is Zorlan. I need the sport of Zorlan. </think>
                    <search> Zorlan sport </search>
        read        <think> The sport of Zorlan is polo. </think> <answer> polo </answer>
        or guess    <think> The city of Bavoki is Zorlan. I know the sport of Zorlan. </think>
                    <answer> golf </answer>
    """
    lookups = [lookup_fields(lookup) for lookup in q["lookups"]]
    turns, read = [], ""
    for lookup in lookups[:searches]:
        turns.append((SEARCH.format(read=read, **lookup), QUERY.format(**lookup)))
        read = SAID.format(**lookup)
    if searches == len(lookups):
        return turns + [(READ.format(read=read, value=lookups[-1]["value"]), None)]
    return turns + [(GUESS.format(read=read, **(lookups[searches] | {"value": guess})), None)]


def warmup_example(q: dict, tokenizer, search, rng: random.Random, share: float,
                   full_prompt: bool = True) -> tuple[list, list, list]:
    """One scripted trajectory: (prompt_ids, response_ids, loss_mask), laid out as rollout() lays
    out a sampled one. With probability `share` it makes every lookup q needs (the real queries, run
    against the index) and reads the answer out of the last passage; otherwise it stops one lookup
    short and guesses a value of that lookup's attribute at random.
    full_prompt False: the prompt is the question alone, without Search-R1's instructions.
    """
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    lookups = len(q["lookups"])
    if rng.random() < share:
        turns = script(q, lookups)
    else:
        turns = script(q, lookups - 1, guess=rng.choice(ALL_VALUES[q["lookups"][-1][1]]))
    response, loss_mask = [], []
    for text, query in turns:
        written = encode(text)
        info = encode(observation(search([query])[0])) if query else []
        response += written + info
        loss_mask += [1] * len(written) + [0] * len(info)  # 1 = written by the policy; observations not
    prompt = (build_prompt(q["question"], tokenizer, False) if full_prompt
              else tokenizer(q["question"] + "\n")["input_ids"])
    return prompt, response, loss_mask


def warmup_loss(model, batch: list[tuple[list, list, list]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the tokens the policy writes, for a batch of warmup_example()s.

    Every prompt is Search-R1's instructions (~100 tokens) and then the question, so the batch's common
    prefix is run once and its KV cache repeated for every row: ~3x less compute than running each
    full sequence, the same logits (the gradient flows back through the cache into the prefix).
    """
    first = batch[0][0]
    P = 0  # shared prefix length; at least one prompt token stays per row, to predict the response
    while all(P + 1 < len(prompt) and prompt[P] == first[P] for prompt, _, _ in batch):
        P += 1
    B, T = len(batch), max(len(prompt) - P + len(response) for prompt, response, _ in batch)
    input_ids = torch.full((B, T), pad_id)                    # (B, T): each row after the prefix
    attention_mask = torch.zeros(B, P + T, dtype=torch.long)  # (B, P + T), right padded
    loss_mask = torch.zeros(B, T)  # 1 = a token the policy writes: predicted and trained on
    for i, (prompt, response, mask) in enumerate(batch):
        row = prompt[P:] + response
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : P + len(row)] = 1
        loss_mask[i, len(prompt) - P: len(row)] = torch.tensor(mask, dtype=torch.float)
    prefix = model(input_ids=torch.tensor([first[:P]]), use_cache=True)
    cache = getattr(prefix, CACHE_KEYWORD)                                      # (1, P) per layer
    cache.batch_repeat_interleave(B)                                            # (B, P)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **{CACHE_KEYWORD: cache},
                   position_ids=torch.arange(P, P + T).expand(B, T)).logits    # (B, T, V)
    # position t predicts token t + 1: loss = -sum_t mask_{t+1} log p(x_{t+1} | x_<=t) / sum mask
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:],
                                            reduction="none")                  # (B, T - 1)
    return (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()


def warm_up(model, tokenizer, questions: list[dict], search, task: TinyTask) -> list[float]:
    """Supervised warm-up on scripted trajectories of `questions`. Returns the loss per step.

    Two phases, as pretraining runs often start on short sequences:
    1. short_steps steps with the question alone as the prompt and skill_share (70%) of the
       trajectories making every lookup. What is hard to learn is copying: the name from the question into
       the query, the value from the passage into the answer. Behind a prompt of ~8 tokens instead
       of Search-R1's ~120, attention finds the token to copy far sooner (measured, 2 layers: the loss
       leaves its plateau near 0.7 after ~175 steps; with the full prompt from the start it is
       still at 0.87 after 350).
    2. The rest with Search-R1's prompt, as the rollout will use it, and search_share (30%) searching:
       the model now searches well when it searches, but decides to 7 times in 10 to guess, so
       greedy decoding guesses and its EM is chance. That decision is what GRPO has to change.
    In the multi-hop task the shares are those of two-hop questions that make both lookups (the
    others search once and guess); the single lookups they are made of are always searched: the
    skill of each search is taught, the decision to search a second time mostly is not.
    """
    rng = random.Random(task.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.warmup_lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in (bar := tqdm(range(task.warmup_steps), desc="warm-up")):
        learning_skills = step < task.short_steps
        share = task.skill_share if learning_skills else task.search_share
        batch = [warmup_example(q, tokenizer, search, rng, share if len(q["lookups"]) == task.hops else 1.0,
                                full_prompt=not learning_skills)
                 for q in rng.sample(questions, task.warmup_batch)]
        loss = warmup_loss(model, batch, tokenizer.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


# ----------------------------------------------------------------------------- the whole task
def prepare(run: Path, task: TinyTask = TinyTask(), topk: int = 3) -> dict:
    """Write data, corpus, index, tokenizer and warm-up model under `run`; returns their paths.

    run/data/{corpus,train,test}.jsonl, run/index/ (BM25), run/warmup/ (model + tokenizer, in
    Hugging Face format: searchr1.train() loads it like any hub model). run/task.json, written
    last, names the task they were made for: a rerun of the same task (or --resume) reuses them,
    so a resumed run's LoRA goes back onto the very base it was trained on.
    """
    data, done = run / "data", run / "task.json"
    paths = {"corpus": data / "corpus.jsonl", "train_data": data / "train.jsonl",
             "eval_data": data / "test.jsonl", "index_dir": run / "index", "model": run / "warmup"}
    result = {key: str(path) for key, path in paths.items()}
    settings = json.dumps({**asdict(task), "topk": topk}, sort_keys=True)
    if done.is_file() and done.read_text() == settings and paths["model"].is_dir():
        return result
    done.unlink(missing_ok=True)  # from here until it is rewritten, the folder holds no finished task
    data.mkdir(parents=True, exist_ok=True)
    corpus, train, test = make_knowledge_base(task)
    write_jsonl(paths["corpus"], corpus)
    write_jsonl(paths["train_data"], [q for q in train if len(q["lookups"]) == task.hops])  # RL's questions
    write_jsonl(paths["eval_data"], test)
    index = BM25Index.open(paths["corpus"], index_dir=paths["index_dir"])
    search = lambda queries: [format_passages(hits) for hits in index.search(queries, k=topk)]

    tokenizer = train_tokenizer(vocabulary_texts(train + test, search))
    model = tiny_qwen2(tokenizer, task)
    warm_up(model, tokenizer, train, search, task)
    tmp = run / "warmup.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed while saving
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(paths["model"], ignore_errors=True)
    os.replace(tmp, paths["model"])
    write_atomic(done, settings)
    return result


# ----------------------------------------------------------------------------- reporting
def before_after_table(before: dict, after: dict, algo: str) -> str:
    """The held-out results of the warm-up model and of the RL-trained one, as a text table."""
    lines = [f"{'held-out, greedy':<20}{'EM':>8}{'searches/question':>20}{'answer rate':>14}"]
    for name, r in (("warm-up (before)", before), (f"after {algo}", after)):
        lines.append(f"{name:<20}{r['em']:>8.3f}{r['searches']:>20.2f}{r['answered']:>14.3f}")
    return "\n".join(lines)
