"""Tests of tiny.py: the generated task and its tokenizer, the warm-up, and -- the point of the
chapter -- that GRPO through searchr1's own training loop teaches the tiny model to search."""
import random

import pytest
import torch

import tiny
from eval import exact_match, extract_answer
from retriever import BM25Index, format_passages
from rollout import INVALID_ACTION, STOP_STRINGS, build_prompt, observation, parse_action

SMALL = tiny.TinyTask(entities=40, held_out=15)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """Knowledge base, BM25 search and tokenizer of a 40-entity task (no warm-up: it is slow)."""
    corpus_rows, train, test = tiny.make_knowledge_base(SMALL)
    folder = tmp_path_factory.mktemp("tiny")
    tiny.write_jsonl(folder / "corpus.jsonl", corpus_rows)
    index = BM25Index.open(folder / "corpus.jsonl", index_dir=folder / "index")
    search = lambda queries: [format_passages(hits) for hits in index.search(queries, k=3)]
    tokenizer = tiny.train_tokenizer(tiny.vocabulary_texts(train + test, search))
    return {"corpus": corpus_rows, "train": train, "test": test, "index": index, "search": search,
            "tokenizer": tokenizer}


def test_held_out_facts_are_never_asked_in_training_but_their_entities_are(small_task):
    facts = lambda rows: {(q["entity"], q["attribute"]) for q in rows}
    train, test = small_task["train"], small_task["test"]
    assert len(test) == SMALL.held_out and len(train) + len(test) == 3 * SMALL.entities
    assert not facts(train) & facts(test)
    assert {q["question"] for q in train}.isdisjoint(q["question"] for q in test)
    assert {entity for entity, _ in facts(test)} <= {entity for entity, _ in facts(train)}


def test_the_same_seed_makes_the_same_task_and_another_seed_another():
    assert tiny.make_knowledge_base(SMALL) == tiny.make_knowledge_base(SMALL)
    other = tiny.TinyTask(entities=SMALL.entities, held_out=SMALL.held_out, seed=1)
    assert tiny.make_knowledge_base(other)[1] != tiny.make_knowledge_base(SMALL)[1]


def test_every_answer_is_only_in_the_corpus_and_its_query_retrieves_it_first(small_task):
    by_id = {row["id"]: row["contents"] for row in small_task["corpus"]}
    for q in small_task["train"] + small_task["test"]:
        assert q["golden_answers"][0] not in q["question"]
        best = small_task["index"].search([tiny.QUERY.format(**q)], k=3)[0][0]
        assert by_id[best["id"]].endswith(f"The {q['attribute']} of {q['entity']} is {q['golden_answers'][0]}.")


def test_tokenizer_round_trips_prompt_tags_and_passages_exactly(small_task, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = small_task["tokenizer"]
    q = small_task["test"][0]
    texts = [tokenizer.decode(build_prompt(q["question"], tokenizer, False)), INVALID_ACTION,
             tiny.SEARCH.format(**q), observation(small_task["search"]([tiny.QUERY.format(**q)])[0]),
             tiny.READ.format(**q, value=q["golden_answers"][0])]
    tokenizer.save_pretrained(tmp_path)
    for t in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        for text in texts:
            assert t.decode(t.encode(text, add_special_tokens=False)) == text
        for tag in tiny.TAGS:  # one token each, and kept by skip_special_tokens
            ids = t.encode(tag, add_special_tokens=False)
            assert len(ids) == 1 and t.decode(ids, skip_special_tokens=True) == tag
    # a name is one token, so copying it into a query is one step
    assert len(tokenizer.encode(" " + q["entity"], add_special_tokens=False)) == 1


def test_decoded_turns_are_what_the_rollout_and_the_reward_look_for(small_task):
    tokenizer = small_task["tokenizer"]
    q = small_task["train"][0]
    decode = lambda text: tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    search_turn, answer_turn = decode(tiny.SEARCH.format(**q)), decode(tiny.READ.format(**q, value="x"))
    assert search_turn.endswith(STOP_STRINGS[0]) and answer_turn.endswith(STOP_STRINGS[1])
    assert parse_action(search_turn) == ("search", tiny.QUERY.format(**q))
    answer_turn = decode(tiny.READ.format(**q, value=q["golden_answers"][0]))
    assert exact_match(extract_answer(answer_turn), q["golden_answers"]) == 1.0


def test_warm_up_trajectory_is_laid_out_as_the_rollout_lays_it_out(small_task):
    tokenizer, search, q = small_task["tokenizer"], small_task["search"], small_task["train"][0]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    searching = tiny.TinyTask(search_share=1.0)
    prompt, response, loss_mask = tiny.warmup_example(q, tokenizer, search, random.Random(0), searching)
    first, last = encode(tiny.SEARCH.format(**q)), encode(tiny.READ.format(**q, value=q["golden_answers"][0]))
    info = encode(observation(search([tiny.QUERY.format(**q)])[0]))
    assert prompt == build_prompt(q["question"], tokenizer, False)
    assert response == first + info + last
    assert loss_mask == [1] * len(first) + [0] * len(info) + [1] * len(last)  # observation: not trained
    guessing = tiny.TinyTask(search_share=0.0)
    _, response, loss_mask = tiny.warmup_example(q, tokenizer, search, random.Random(0), guessing)
    action, guess = parse_action(tokenizer.decode(response))
    assert action == "answer" and guess in tiny.VALUES[q["attribute"]] and all(loss_mask)


def test_shared_prefix_warm_up_loss_equals_the_loss_over_full_sequences(small_task):
    """The warm-up runs the prompts' common prefix once; the loss must not change."""
    tokenizer, search = small_task["tokenizer"], small_task["search"]
    model = tiny.tiny_qwen2(tokenizer, tiny.TinyTask(hidden=32))
    rng = random.Random(0)
    batch = [tiny.warmup_example(q, tokenizer, search, rng, tiny.TinyTask(search_share=0.5))
             for q in small_task["train"][:6]]
    total, n = 0.0, 0
    for prompt, response, mask in batch:  # the plain way: each full sequence on its own
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = logits[len(prompt) - 1: -1].log_softmax(-1)                      # (R, V)
        nll = -logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)
        total, n = total + (nll * torch.tensor(mask)).sum(), n + sum(mask)
    shared = tiny.warmup_loss(model, batch, tokenizer.pad_token_id)
    torch.testing.assert_close(shared, total / n, rtol=1e-5, atol=1e-5)
