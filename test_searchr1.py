"""searchr1's tests of the learning path, training and the tiny task: small, seeded, offline, each
named for the behaviour it proves. A section per chapter in reading order: retriever.py, rollout.py,
grpo.py, ppo.py, eval.py, training (searchr1.py with policy.py, runs.py, distributed.py, plan.py and
bench.py gpu), tiny.py. The commands and the search server: test_commands.py; shared fixtures: conftest.py."""

import copy
import dataclasses
import functools
import gc
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import tantivy
import torch
from rank_bm25 import BM25Okapi
from transformers import AutoTokenizer

import agent
import bench
import cli
import distributed
import grpo
import plan
import policy
import ppo
import rollout as rollout_chapter
import runs
import searchr1
import tiny
from conftest import (DATA, QWEN_CHAT, QWEN_INSTRUCT_SYSTEM, QWEN_TOKENIZER, REFERENCE_CASE_PROMPT,
                      REFERENCE_INVALID, REFERENCE_PROMPT, ROOT, answer_every_other, ids, random_qwen2,
                      steer_rollouts, steered, tiny_config, write_jsonl)
from eval import (DataError, exact_match, extract_answer, load_qa, normalize_answer, read_qa_file,
                  sub_exact_match, token_f1)
from grpo import clipped_policy_loss, group_advantages, grpo_loss, low_var_kl, token_logprobs
from ppo import actor_loss, critic_loss, gae, token_rewards, whiten
from retriever import (BM25Index, CorpusError, default_index_dir, FINGERPRINT_FILE, format_passages,
                       read_corpus, split_contents, tokenize)
from rollout import (_sample, build_prompt, INVALID_ACTION, observation, parse_action, rollout, rollout_plain,
                     RolloutConfig, STOP_STRINGS, Trajectory)


# ===================================================================================== retriever.py

ROWS = [  # Search-R1's format: the title line keeps its quotes, as in wiki-18
    {"id": "0", "contents": '"Apple"\nThe apple is a fruit of the apple tree.'},
    {"id": "1", "contents": '"Banana"\nA banana is an elongated, edible fruit.\nIt grows in clusters.'},
    {"id": "2", "contents": '"Cherry"\nThe cherry is a fleshy drupe; cherries are red.'},
    {"id": "3", "contents": '"Paris"\nParis is the capital of France.'},
    {"id": "4", "contents": '"Apple Inc."\nApple designs phones in Cupertino.'},
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Default index folders go under tmp_path, never under ~/.cache."""
    monkeypatch.setenv("SEARCHR1_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", ROWS)


@pytest.fixture(scope="module")
def wiki_index(tmp_path_factory) -> BM25Index:
    return BM25Index.open(DATA / "wiki18-sample-1000.jsonl", tmp_path_factory.mktemp("wiki"))


def test_both_row_formats_plain_and_gzip_read_the_same_passages(tmp_path):
    title_text_rows = [{"id": int(row["id"]), "title": row["contents"].split("\n")[0].strip('"'),
                        "text": row["contents"].split("\n", 1)[1]} for row in ROWS]
    readings = [list(read_corpus(write_jsonl(tmp_path / name, rows + [""], compress=name.endswith(".gz"))))
                for name, rows in [("a.jsonl", ROWS), ("a.jsonl.gz", ROWS),
                                   ("b.jsonl", title_text_rows), ("b.jsonl.gz", title_text_rows)]]
    assert readings[0] == [{"id": row["id"], "contents": row["contents"]} for row in ROWS]
    assert readings[1] == readings[2] == readings[3] == readings[0]


@pytest.mark.parametrize("bad_row, field", [
    ('{"id": "9", "contents": "unterminated', "invalid JSON"),
    ('{"id": "9", "text": "a title is missing"}', "contents"),
    ('{"contents": "\\"T\\"\\nno id"}', "id"),
    ('{"id": ["9"], "contents": "x"}', "id"),
    ('{"id": "9", "contents": 42}', "contents"),
    ('["9", "not an object"]', "JSON object"),
])
def test_a_malformed_line_names_the_file_line_and_field(tmp_path, bad_row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "", bad_row, ROWS[1]])  # bad row on line 3
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + f".*{field}"):
        list(read_corpus(path))


def test_an_empty_corpus_is_a_clear_error(tmp_path, cache):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(CorpusError, match=f"{path}: the corpus has no passages"):
        BM25Index.open(path)
    assert not default_index_dir(path).exists()


def test_split_contents_keeps_the_title_line_as_is_and_joins_the_rest():
    assert split_contents('"Banana"\nA banana.\nIt grows.') == ('"Banana"', "A banana.\nIt grows.")
    assert split_contents("No newline") == ("No newline", "")


def test_tokenizer_splits_on_non_alphanumerics_lowercases_and_drops_stopwords():
    assert tokenize("The U.S. Army's F-16, in 1990!") == ["u", "s", "army", "s", "f", "16", "1990"]
    assert tokenize("the of AND a") == []


def test_indexed_tokens_are_exactly_what_tokenize_returns(corpus, tmp_path):
    index = BM25Index.open(corpus, tmp_path / "index")
    # read the term dictionary straight from the files on disk: term -> passages holding it
    indexed = dict(tantivy.Index.open(str(index.index_dir)).searcher().terms_with_prefix("contents", ""))
    expected = Counter(term for row in ROWS for term in set(tokenize(row["contents"])))
    assert indexed == dict(expected)


def test_the_second_open_loads_the_cached_index_without_rebuilding(corpus, cache):
    first = BM25Index.open(corpus)
    assert first.index_dir == default_index_dir(corpus) and first.index_dir.is_relative_to(cache)
    folder_inode = first.index_dir.stat().st_ino  # a build renames a fresh folder into place
    fingerprint = json.loads((first.index_dir / FINGERPRINT_FILE).read_text())
    assert fingerprint["passages"] == len(first) == len(ROWS)
    second = BM25Index.open(corpus)
    assert second.index_dir.stat().st_ino == folder_inode
    assert second.search(["cherries"])[0][0]["id"] == "2"
    assert BM25Index.open(corpus, rebuild=True).index_dir.stat().st_ino != folder_inode


def test_a_changed_corpus_rebuilds_and_finds_the_new_passage(corpus, cache):
    old = BM25Index.open(corpus)
    folder_inode = old.index_dir.stat().st_ino
    assert old.search(["zanzibar"]) == [[]]
    write_jsonl(corpus, ROWS + [{"id": "5", "contents": '"Zanzibar"\nAn archipelago.'}])
    new = BM25Index.open(corpus)
    assert new.index_dir.stat().st_ino != folder_inode
    assert len(new) == len(ROWS) + 1
    assert [hit["id"] for hit in new.search(["zanzibar"])[0]] == ["5"]


def test_an_unfinished_build_never_loads(corpus, tmp_path):
    index_dir = tmp_path / "index"
    # a build that stops half-way (here: at a bad line) leaves no index folder behind
    broken = write_jsonl(tmp_path / "broken.jsonl", ROWS + ["{not json"])
    with pytest.raises(CorpusError):
        BM25Index.open(broken, index_dir)
    assert not index_dir.exists() and index_dir.with_name("index.partial").exists()
    # the next build clears the leftover partial folder
    BM25Index.open(corpus, index_dir)
    assert not index_dir.with_name("index.partial").exists()
    # a folder whose fingerprint was never written is rebuilt, not loaded
    folder_inode = index_dir.stat().st_ino
    (index_dir / FINGERPRINT_FILE).unlink()
    index = BM25Index.open(corpus, index_dir)
    assert index_dir.stat().st_ino != folder_inode and (index_dir / FINGERPRINT_FILE).exists()
    assert index.search(["paris"])[0][0]["id"] == "3"


def test_a_folder_that_is_not_an_index_is_never_replaced(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        BM25Index.open(corpus, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_search_returns_one_ranked_list_per_query_in_query_order(corpus, tmp_path):
    index = BM25Index.open(corpus, tmp_path / "index")
    results = index.search(["capital of France", "edible banana", "red cherries", "apple"], k=3)
    assert [hits[0]["id"] for hits in results] == ["3", "1", "2", "0"]
    apple = results[3]
    assert [hit["id"] for hit in apple] == ["0", "4"]  # only the passages holding "apple"
    assert apple[0]["score"] > apple[1]["score"] > 0
    banana = results[1][0]
    assert banana["contents"] == ROWS[1]["contents"]
    assert banana["title"] == '"Banana"'
    assert banana["text"] == "A banana is an elongated, edible fruit.\nIt grows in clusters."


def test_empty_and_stopword_only_queries_return_no_hits(corpus, tmp_path):
    index = BM25Index.open(corpus, tmp_path / "index")
    results = index.search(["", "   ", "the of and", "?!", 'paris AND "capital":'])
    assert results[:4] == [[], [], [], []]
    assert results[4][0]["id"] == "3"  # query-language syntax is plain text here


def test_k_larger_than_the_corpus_returns_every_matching_passage(corpus, tmp_path):
    index = BM25Index.open(corpus, tmp_path / "index")
    assert sorted(hit["id"] for hit in index.search(["fruit apple"], k=1000)[0]) == ["0", "1", "4"]
    assert len(index.search(["fruit apple"], k=1)[0]) == 1
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(["apple"], k=0)
    with pytest.raises(TypeError):
        index.search("apple")


def test_format_passages_is_spec_section_3_on_real_wiki18_passages(wiki_index):
    raw = {row["id"]: row for row in map(json.loads, (DATA / "wiki18-sample-1000.jsonl").open())}
    hits = wiki_index.search(["Evan Morris, lobbyist in Washington"], k=3)[0]
    assert hits[0]["id"] == "0" and len(hits) == 3
    expected = ""
    for i, hit in enumerate(hits, start=1):
        lines = raw[hit["id"]]["contents"].split("\n")
        expected += f"Doc {i}(Title: {lines[0]}) {chr(10).join(lines[1:])}\n"
    assert format_passages(hits) == expected.strip()
    assert format_passages(hits).startswith('Doc 1(Title: "Evan Morris") Evan Morris Evan L. Morris')
    assert format_passages([]) == ""


class LuceneIdfBM25Okapi(BM25Okapi):
    """rank-bm25's BM25Okapi with Lucene's idf, ln(1 + (N - n + 0.5) / (n + 0.5)).

    BM25Okapi's own idf is ln((N - n + 0.5) / (n + 0.5)): negative for a term in more than half
    of the passages, where it is replaced by 0.25 * the mean idf. Lucene's (and tantivy's) stays
    positive. That is the one place where the two formulas differ besides k1.
    """

    def _calc_idf(self, nd):  # nd: term -> number of passages holding it
        self.idf = {term: math.log(1 + (self.corpus_size - n + 0.5) / (n + 0.5)) for term, n in nd.items()}


def test_top_k_equals_rank_bm25_okapi_on_the_same_tokens(tmp_path):
    # The engine and BM25Okapi differ by construction in (a) idf (see LuceneIdfBM25Okapi), (b) k1
    # (tantivy fixes 1.2; BM25Okapi defaults to 1.5) and (c) passage lengths, which tantivy keeps in
    # one lossy byte (exact below 24 tokens). With Lucene's idf, k1 = 1.2, b = 0.75 and passages
    # under 24 tokens, the two must rank identically, up to the order of equal scores.
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(3000)])
    zipf = 1.0 / np.arange(1, len(vocab) + 1)  # common words appear in over half the passages
    passages = [" ".join(rng.choice(vocab, size=rng.integers(4, 23), p=zipf / zipf.sum()))
                for _ in range(3000)]
    corpus = [{"id": str(i), "contents": f'"{p.split()[0]}"\n{p}'} for i, p in enumerate(passages)]
    tokens = [tokenize(row["contents"]) for row in corpus]
    assert max(map(len, tokens)) < 24
    reference = LuceneIdfBM25Okapi(tokens, k1=1.2, b=0.75)

    index = BM25Index.open(write_jsonl(tmp_path / "c.jsonl", corpus), tmp_path / "index")
    queries = [" ".join(rng.choice(tokens[i], size=min(3, len(tokens[i])), replace=False))
               for i in rng.integers(0, len(corpus), size=60)]
    k, exact = 10, 0
    for query, hits in zip(queries, index.search(queries, k=k)):
        ref = reference.get_scores(tokenize(query))  # (N,)
        ref_top = np.sort(ref)[::-1][:k]
        ours = np.array([int(hit["id"]) for hit in hits])
        # our k passages have the reference's k best scores, and we score them as it does
        np.testing.assert_allclose(ref[ours], ref_top, rtol=1e-5)
        np.testing.assert_allclose([hit["score"] for hit in hits], ref[ours], rtol=1e-5)
        exact += list(ours) == list(np.argsort(-ref, kind="stable")[:k])
    assert exact >= len(queries) // 2  # most rankings have no ties and match id for id


def length_to_byte(length: int) -> int:
    """Lucene's SmallFloat.intToByte4, which tantivy uses to keep a passage length in one byte.

    Lengths below 24 are stored as is. Above, rest = length - 24 is a tiny float: its 4 leading
    bits (the first, always 1, implicit) and how far they were shifted.
    """
    if length < 24:
        return length
    rest = length - 24
    if rest < 8:  # 3 bits or fewer: stored exactly
        return 24 + rest
    shift = rest.bit_length() - 4
    return 24 + (((shift + 1) << 3) | ((rest >> shift) & 0b111))


def byte_to_length(byte: int) -> int:
    """Lucene's SmallFloat.byte4ToInt: the length BM25 sees. 100 -> 24 + 72 = 96."""
    if byte < 24:
        return byte
    code = byte - 24
    mantissa, shift = code & 0b111, (code >> 3) - 1
    return 24 + (mantissa if shift < 0 else (mantissa | 0b1000) << shift)


def test_one_byte_lengths_are_exact_up_to_40_then_rounded_down():
    assert [byte_to_length(length_to_byte(n)) for n in (0, 23, 24, 40, 41, 100, 1000)] == \
        [0, 23, 24, 40, 40, 96, 984]
    assert max(length_to_byte(n) for n in range(100_000)) < 256


def test_top3_equals_lucene_bm25_written_in_numpy_on_real_wiki18_and_nq(wiki_index):
    rows = [json.loads(line) for line in (DATA / "wiki18-sample-1000.jsonl").open()]
    questions = [json.loads(line)["question"] for line in (DATA / "nq-test-17.jsonl").open()]
    passages = [Counter(tokenize(row["contents"])) for row in rows]
    length = np.array([sum(p.values()) for p in passages], dtype=float)  # (N,)
    stored_length = np.array([byte_to_length(length_to_byte(int(n))) for n in length])  # (N,)
    k1, b, avgdl, N = 1.2, 0.75, length.mean(), len(rows)  # avgdl from the exact lengths
    for question, hits in zip(questions, wiki_index.search(questions, k=3)):
        score = np.zeros(N)
        for term in tokenize(question):
            tf = np.array([p[term] for p in passages], dtype=float)  # (N,)
            n = np.count_nonzero(tf)
            idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * stored_length / avgdl))
        top3 = np.argsort(-score, kind="stable")[:3]
        assert [hit["id"] for hit in hits] == [rows[i]["id"] for i in top3], question
        np.testing.assert_allclose([hit["score"] for hit in hits], score[top3], rtol=1e-5)


# ======================================================================================= rollout.py

def rollout_cfg(**settings) -> RolloutConfig:
    """A RolloutConfig for the rollout tests: 2 search turns, 500-token budgets, temperature 1, no nucleus,
    5 samples a prompt, unless a test says otherwise."""
    return RolloutConfig(**{**dict(max_turns=2, max_new_tokens=500, max_obs_tokens=500, temperature=1.0, top_p=1.0,
                                   n_samples=5), **settings})


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


def test_build_prompt_plain_text_is_the_reference_template_with_question_mark_rule(tok):
    expected = REFERENCE_PROMPT.format(question="who wrote hamlet?")  # stripped, "?" appended
    assert build_prompt("  who wrote hamlet ", tok, chat=False) == ids(tok, expected)
    assert tok.decode(build_prompt("  who wrote hamlet ", tok, chat=False)) == expected
    assert tok.decode(build_prompt("is it?", tok, chat=False)) == REFERENCE_PROMPT.format(question="is it?")


def test_build_prompt_chat_is_the_reference_text_as_the_user_turn_of_qwens_template_byte_for_byte(tok):
    text = tok.decode(build_prompt("who wrote hamlet", tok, chat=True))
    assert text == QWEN_CHAT.format(user=REFERENCE_PROMPT.format(question="who wrote hamlet?"))


def test_a_base_qwen_tokenizer_gives_the_prompt_the_reference_trained_on_byte_for_byte(tok):
    base = copy.deepcopy(tok)  # Qwen2.5 base: the same template with its own default system line
    base.chat_template = tok.chat_template.replace(QWEN_INSTRUCT_SYSTEM, "You are a helpful assistant.")
    prompt = build_prompt("paul walkers cars in fast and furious list", base, chat=True)
    assert base.decode(prompt) == REFERENCE_CASE_PROMPT


def without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_chat_auto_means_the_template_whenever_the_tokenizer_has_one_and_plain_text_otherwise(tok):
    base = searchr1.Config(model="qwen2.5-3b")  # a base model: the reference still uses its template
    assert policy.uses_chat_template(base, tok) is True
    assert policy.uses_chat_template(base, without_chat_template(tok)) is False
    assert policy.uses_chat_template(dataclasses.replace(base, chat="no"), tok) is False
    with pytest.raises(cli.UsageError, match="no chat template"):
        policy.uses_chat_template(dataclasses.replace(base, chat="yes"), without_chat_template(tok))


def test_the_reference_tables_flags_are_the_defaults():
    """Every `--flag value` (or `eval --flag value`) that docs/reference.md's table "searchr1 vs the
    released Search-R1" claims is that command's default, so the table cannot drift from the code."""
    page = (ROOT / "docs" / "reference.md").read_text()
    table = page.split("## searchr1 vs the released Search-R1")[1].split("\n## ")[0]
    claims = re.findall(r"`(?:(eval|ask) )?--([a-z0-9-]+) ([^`]+)`", table)
    assert len(claims) >= 25
    for command, flag, value in claims:
        name = command or "train"
        parser = cli.command_parser(name, searchr1.COMMANDS[name], searchr1.Config)
        default = parser.get_default(flag.replace("-", "_"))
        assert str(default) == value, f"docs/reference.md says {name} --{flag} {value}; the default is {default}"
    cfg = searchr1.Config()  # "320 / 32 = 10 steps a batch", the reference's 2,560 / 256
    assert cfg.batch_size * cfg.group_size / cfg.mini_batch_size == 2560 / 256 == 10


def test_the_reading_order_counts_its_own_lines():
    """README's reading order names the definitions to read, file by file; the number of lines it gives
    is theirs (def or class line to its end), counted from the code."""
    import ast
    readme = (ROOT / "README.md").read_text()
    order = readme.split("**Reading order**")[1].split("\n## ")[0]
    stated = int(re.search(r"\(([\d,]+) lines", order).group(1).replace(",", ""))
    counted = 0
    items = re.findall(r"^\d\. `(\w+\.py)`: (.*?)(?=^\d\. |\Z)", order, flags=re.MULTILINE | re.DOTALL)
    assert [file for file, _ in items] == ["rollout.py", "eval.py", "grpo.py", "searchr1.py", "ppo.py", "retriever.py"]
    for file, names in items:
        tree = ast.parse((ROOT / file).read_text())
        spans = {node.name: (node.lineno, node.end_lineno) for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        spans |= {f"{holder.name}.{node.name}": (node.lineno, node.end_lineno) for holder in tree.body
                  if isinstance(holder, ast.ClassDef) for node in holder.body if isinstance(node, ast.FunctionDef)}
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", names):
            assert name in spans, f"README's reading order names {name}, which {file} does not define"
            counted += spans[name][1] - spans[name][0] + 1
    assert stated == counted


def test_the_project_calls_rollout_through_its_module_so_a_test_can_steer_every_rollout():
    """steer_rollouts replaces rollout.rollout on the module: a file that took the function by its own
    name (`from rollout import rollout`) would keep the real one, and its rollouts go unsteered. (The
    tests hold it by name to wrap it; bench.py times the real one.)"""
    import ast
    for path in sorted(p for p in ROOT.glob("*.py") if not p.name.startswith(("test_", "conftest", "bench"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rollout":
                assert "rollout" not in [alias.name for alias in node.names], f"{path.name}:{node.lineno}"


def test_every_pointer_to_a_readme_heading_or_a_docs_page_leads_somewhere():
    """"README: <heading>" in the code names a heading README has; every docs/... path named in the
    code, README or the docs pages exists."""
    files = [*(p for p in ROOT.glob("*.py") if not p.name.startswith("test_")), *ROOT.glob("*.sh"),
             *ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / ".ci" / "run", ROOT / "requirements.txt"]
    headings = re.findall(r"^#+ (.*)$", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    pointers = 0
    for path in files:
        text = path.read_text()
        for heading in re.findall(r"README: ([^)\n]+?)[).]", text):
            pointers += 1
            assert any(h.lower().startswith(heading.lower()) for h in headings), f"{path.name}: README: {heading}"
        for page in re.findall(r"\bdocs/[\w./-]*\w", text):
            pointers += 1
            assert (ROOT / page).exists(), f"{path.name} points at {page}"
        for link in re.findall(r"\]\(([^)#\s]+)\)", text) if path.suffix == ".md" else []:
            pointers += 1  # a Markdown link or picture: from the page's own folder, as a reader's viewer finds it
            assert link.startswith("http") or (path.parent / link).exists(), f"{path.name} links {link}"
    assert pointers > 20


def test_observation_and_passages_are_laid_out_as_the_reference_does():
    hits = [{"title": '"Paul Walker"', "text": "an actor"}, {"title": "Cars", "text": "a film\nof 2006"}]
    assert format_passages(hits) == 'Doc 1(Title: "Paul Walker") an actor\nDoc 2(Title: Cars) a film\nof 2006'
    assert observation(format_passages(hits) + "\n") == (
        '\n\n<information>Doc 1(Title: "Paul Walker") an actor\nDoc 2(Title: Cars) a film\nof 2006</information>\n\n')


@pytest.mark.floor
def test_search_then_answer_gives_exact_tokens_text_and_loss_mask(tok, model):
    turn0 = [ids(tok, f" <think> hm </think> <search> q{r} </search>") for r in range(4)]
    turn1 = ids(tok, " <answer> y </answer>")
    calls = []
    cfg = rollout_cfg(max_turns=2, max_new_tokens=30, n_samples=2)
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


@pytest.mark.floor
def test_turn_without_action_gets_the_invalid_action_message(tok, model):
    assert INVALID_ACTION == REFERENCE_INVALID
    answer = ids(tok, " <answer> y </answer>")
    rambling = (ids(tok, " I am not sure") * 2)[: len(answer)]
    calls = []
    cfg = rollout_cfg(max_turns=2, max_new_tokens=len(answer), n_samples=1)  # turn 0 ends on its budget
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search(calls), cfg,
                   logits_hook=forcing([[rambling, answer]]))
    assert calls == []
    assert t.response_ids == rambling + ids(tok, REFERENCE_INVALID) + answer
    assert t.loss_mask == [1] * len(rambling) + [0] * len(ids(tok, REFERENCE_INVALID)) + [1] * len(answer)
    assert (t.n_searches, t.n_turns, t.answered) == (0, 2, True)


@pytest.mark.floor
def test_eos_ends_the_turn_and_is_kept_as_a_sampled_token(tok, model):
    eos = tok.eos_token_id
    turn0 = ids(tok, " maybe") + [eos] + ids(tok, " never sampled")
    answer = ids(tok, " <answer> y </answer>")
    cfg = rollout_cfg(max_turns=2, max_new_tokens=20, n_samples=1)
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search([]), cfg,
                   logits_hook=forcing([[turn0, answer]]))
    sampled0 = ids(tok, " maybe") + [eos]
    assert t.response_ids == sampled0 + ids(tok, REFERENCE_INVALID) + answer  # no action before EOS: invalid
    assert t.loss_mask[: len(sampled0)] == [1] * len(sampled0)
    assert (t.n_turns, t.answered) == (2, True)


@pytest.mark.floor
@pytest.mark.parametrize("max_turns", [0, 1])
def test_last_turn_after_max_turns_runs_no_search(tok, model, max_turns):
    search_turn = ids(tok, " <search> x </search>")
    calls = []
    cfg = rollout_cfg(max_turns=max_turns, max_new_tokens=20, n_samples=1)
    (t,) = rollout(model, tok, prompts_for(tok, ["q"]), recording_search(calls), cfg,
                   logits_hook=forcing([[search_turn] * 5]))
    obs = ids(tok, "\n\n<information>Doc 1(Title: x) all about x</information>\n\n")
    assert calls == [["x"]] * max_turns
    assert t.response_ids == (search_turn + obs) * max_turns + search_turn  # ends on the unexecuted search
    assert (t.n_searches, t.n_turns, t.answered, t.queries) == (max_turns, max_turns + 1, False, ["x"] * max_turns)


@pytest.mark.floor
def test_stop_string_ending_inside_a_token_cuts_right_after_that_token(tok, model):
    turn0 = ids(tok, "<search>query</search>\n") + ids(tok, " after the stop")
    assert tok.decode(turn0[6]) == ">\n"  # Qwen: `</`, `search`, `>\n` — the stop ends inside the last token
    cfg = rollout_cfg(max_turns=1, max_new_tokens=20, n_samples=1)
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


def test_stop_strings_found_by_the_token_table_are_the_ones_decoding_finds(tok):
    """turn_ends looks each token's text up alone; decoding the whole tail (the slow way) must agree at
    every step, on random turns salted with the pieces Qwen writes tags in."""
    pieces = [ids(tok, text) for text in ("</search>", "query</search>\n", " </answer>", "</", "search", ">\n",
                                          "answer>", "<search>", " 日本</search>", "é</answer>")]
    g = random.Random(0)
    budget, eos = 40, {tok.eos_token_id}
    turn_over = rollout_chapter.turn_ends(tok, eos, budget)
    for _ in range(200):
        turn = []
        while len(turn) < budget:
            turn += g.choice(pieces) if g.random() < 0.3 else [g.randrange(tok.vocab_size)]
        for end in range(1, budget + 1):
            prefix = turn[:end]
            decoded = tok.decode(prefix[-rollout_chapter._TAIL:])
            expected = prefix[-1] in eos or end == budget or any(stop in decoded for stop in STOP_STRINGS)
            assert turn_over([prefix]) == [expected], tok.convert_ids_to_tokens(prefix[-9:])


def live_kv_bytes(config) -> int:
    """Bytes of every live tensor that holds keys or values of `config`'s shape (..., kv heads, slots,
    head dim): the cache, and any copy of a piece of it, counted once per storage."""
    head_dim = config.hidden_size // config.num_attention_heads
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.dim() >= 3 and obj.shape[-1] == head_dim \
                and obj.shape[-3] == config.num_key_value_heads and obj.is_floating_point():
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def test_the_cache_keyword_follows_the_transformers_release_pre_releases_included():
    assert rollout_chapter.cache_keyword("5.17.0") == "past_key_values"  # the lent GPU's, the floor
    assert rollout_chapter.cache_keyword("5.23.2") == "past_key_values"
    assert rollout_chapter.cache_keyword("5.24.0") == rollout_chapter.cache_keyword("5.24.0.dev0") == "cache"


@pytest.mark.floor
def test_the_rollout_never_holds_more_kv_cache_than_the_memory_plan_counts(tok, model):
    """plan.py's rollout term is rows x (prompt + response budget) x kv bytes a token. Live keys and
    values, counted as every layer starts its forward, through a rollout whose turns and observations
    all run to their budgets: their peak is that term, never a second copy at a turn boundary."""
    turn = ids(tok, " <search> q </search>")
    cfg = rollout_cfg(max_turns=2, max_new_tokens=len(turn), max_obs_tokens=20, temperature=0.0, n_samples=2)
    gc.collect()  # what earlier tests left in reference cycles, then what still lives, is not this rollout's
    before, peaks = live_kv_bytes(model.config), []
    hooks = [layer.register_forward_pre_hook(lambda *_: peaks.append(live_kv_bytes(model.config) - before))
             for layer in model.model.layers]
    prompts = prompts_for(tok, ["a b c", "d e f"])
    search = lambda queries: ["Doc 1(Title: T) " + "word " * 50] * len(queries)  # cut at 20 tokens
    try:
        (t, *_) = rollout(model, tok, prompts, search, cfg, logits_hook=forcing([[turn] * 3] * 4))
    finally:
        for hook in hooks:
            hook.remove()
    assert t.loss_mask.count(0) == 2 * cfg.max_obs_tokens and t.loss_mask.count(1) == 3 * len(turn)
    response = (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens
    planned = plan.phase_bytes(plan.Shape.of(model.config), load_4bit=False, dtype_bytes=4, lora_rank=1,
                               adapters=1, rollout_rows=4, micro_batch=1, prompt_tokens=max(map(len, prompts)),
                               response_tokens=response, new_tokens=1)["kv_cache"]
    assert 0.9 * planned <= max(peaks) <= planned


def test_the_memory_plan_of_qwen25_3b_fits_16_and_24_gb_cards_and_keeps_a_size_it_is_given():
    qwen = plan.Shape(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                      intermediate_size=11008, vocab_size=151936)
    assert qwen.kv_bytes_per_token(2) == 2 * 36 * 2 * 128 * 2 == 36_864      # keys and values, bfloat16
    assert qwen.lora_parameters(16) == 36 * 831_488 == 29_933_568           # r 16 on all 7 projections
    cfg = searchr1.Config()
    sizes = dict(load_4bit=True, dtype_bytes=2, lora_rank=16, adapters=1, questions=cfg.batch_size,
                 samples_per_question=cfg.group_size, mini_batch_size=cfg.mini_batch_size, prompt_tokens=250,
                 response_tokens=3 * 500 + 2 * 500, new_tokens=501)
    for gb, most in ((24, 20), (16, 14)):
        budget = plan.memory_plan(qwen, gb, **sizes)
        assert budget.fits and budget.peak_gb < most and budget.rollout_batch_size >= 1
        assert 1.8 < budget.terms["weights"] < 2.1                           # NF4 layers, 16-bit embeddings
        bigger = plan.memory_plan(qwen, gb, **sizes, rollout_batch_size=budget.rollout_batch_size + 1)
        assert bigger.terms["rollout"] > budget.terms["rollout"]             # the chosen chunk is the largest
        assert bigger.peak_gb > 0.8 * gb or bigger.rollout_batch_size > cfg.batch_size
    assert plan.memory_plan(qwen, 24, **sizes, micro_batch_size=3).micro_batch_size == 3  # a flag wins
    assert not plan.memory_plan(qwen, 3, **sizes).fits
    # --rollout-weights merged: the rollout phase holds a 16-bit copy of every linear weight beside its chunk
    adapter = plan.memory_plan(qwen, 24, **sizes)
    merged = plan.memory_plan(qwen, 24, **sizes, rollout_weights="merged")
    copy_gb = 36 * sum(n_in * n_out for n_in, n_out in qwen.linears()) * 2 / 2**30
    same_chunk = plan.memory_plan(qwen, 24, **sizes, rollout_weights="merged",
                                  rollout_batch_size=adapter.rollout_batch_size)
    unpacked_gb = 2048 * 11008 * 2 / 2**30  # the adapter path's one weight unpacked at a time, which it needs no more
    assert same_chunk.terms["rollout"] - adapter.terms["rollout"] == pytest.approx(copy_gb - unpacked_gb)
    assert merged.rollout_weights == "merged" and merged.fits
    assert merged.rollout_batch_size < adapter.rollout_batch_size
    too_small = plan.memory_plan(qwen, 8, **sizes, rollout_weights="merged")   # 5.1 GB of copy: no room
    assert too_small.rollout_weights == "adapter" and "does not fit" in too_small.note


@pytest.mark.floor
def test_logprobs_equal_a_fresh_full_forward_pass(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth", "when did it happen"])
    cfg = rollout_cfg(max_turns=2, max_new_tokens=14, max_obs_tokens=40, temperature=0.8, n_samples=2)
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


@pytest.mark.floor
def test_greedy_batch_equals_each_prompt_rolled_out_alone(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth", "when did it happen", "why"])
    plans = mixed_plans(tok, 4)
    cfg = rollout_cfg(max_turns=2, max_new_tokens=12, max_obs_tokens=30, temperature=0.0, n_samples=1)
    batch = rollout(model, tok, prompts, recording_search([]), cfg, logits_hook=forcing(plans))
    for p, row_plan, together in zip(prompts, plans, batch):
        (alone,) = rollout(model, tok, [p], recording_search([]), cfg, logits_hook=forcing([row_plan]))
        assert alone.response_ids == together.response_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(together.logprobs), atol=1e-5, rtol=0)


@pytest.mark.floor
def test_the_plain_rollout_makes_the_cached_rollouts_trajectories_under_greedy_decoding(tok, model):
    prompts = prompts_for(tok, ["who", "what is the tallest mountain on earth", "when did it happen", "why"])
    plans = mixed_plans(tok, 4)  # searches, answers, invalid actions and free (model-chosen) tokens
    cfg = rollout_cfg(max_turns=2, max_new_tokens=12, max_obs_tokens=30, temperature=0.0, n_samples=1)
    cached_calls, plain_calls = [], []
    cached = rollout(model, tok, prompts, recording_search(cached_calls), cfg, logits_hook=forcing(plans))
    plain = rollout_plain(model, tok, prompts, recording_search(plain_calls), cfg, logits_hook=forcing(plans))
    assert cached_calls == plain_calls and any(cached_calls)
    for a, b in zip(cached, plain):
        assert (a.response_ids, a.loss_mask, a.text, a.queries) == (b.response_ids, b.loss_mask, b.text, b.queries)
        assert (a.n_turns, a.answered) == (b.n_turns, b.answered)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_sampling_follows_softmax_at_temperature_within_the_nucleus(temperature, top_p):
    torch.manual_seed(0)
    logits, draws = torch.randn(3, 12) * 2, 20000
    many = logits.repeat(draws, 1)  # (3 * draws, 12)
    cfg = rollout_cfg(temperature=temperature, top_p=top_p)
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
                     rollout_cfg(max_turns=1, max_new_tokens=6, temperature=0.0, n_samples=1))
    nucleus = rollout(model, tok, prompts, recording_search([]),
                      rollout_cfg(max_turns=1, max_new_tokens=6, top_p=1e-6, n_samples=1))
    assert [t.response_ids for t in nucleus] == [t.response_ids for t in greedy]


@pytest.mark.floor
def test_turn_and_token_budgets_hold_and_observations_are_truncated(tok, model):
    cfg = rollout_cfg(max_turns=2, max_new_tokens=9, max_obs_tokens=11, temperature=1.0, n_samples=3)
    search = ids(tok, " <search> x </search>")
    plans = [[search if (r + t) % 2 else [] for t in range(3)] for r in range(6)]  # searches and free sampling
    long_passages = lambda qs: ["Doc 1(Title: x) " + "many words " * 200 for _ in qs]  # noqa: E731
    trajs = rollout(model, tok, prompts_for(tok, ["a", "b c d"]), long_passages, cfg, logits_hook=forcing(plans),
                    generator=torch.Generator().manual_seed(1))
    full_obs = {"search": ids(tok, "\n\n<information>" + long_passages(["x"])[0].strip() + "</information>\n\n"),
                "invalid": ids(tok, REFERENCE_INVALID)}
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
    results = bench.main(["rollout", "--trajectories", "3", "--tokens-per-turn", "12", "--obs-tokens", "10",
                          "--prompt-tokens", "5", "--hidden", "64", "--layers", "1", "--tokenizer", str(QWEN_TOKENIZER)])
    assert [r["lengths"] for r in results] == ["equal", "varied"] and all(r["same_tokens"] for r in results)
    assert results[0]["sampled_tokens"] == 3 * 3 * 12 and results[1]["sampled_tokens"] < 3 * 3 * 12
    assert "| equal | 108 |" in capsys.readouterr().out


# ========================================================================================== grpo.py

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
    advantages = torch.randn(B, generator=g)[:, None].expand(B, R)  # A_i on every token of trajectory i
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
    A = advantages
    per_token = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
    d = ref - logp
    per_token = per_token + 0.1 * (torch.exp(d) - d - 1)
    expected = (per_token * loss_mask).sum() / loss_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_entropy_bonus_subtracts_its_coefficient_times_the_masked_token_mean_entropy():
    logp, old, ref, advantages, loss_mask = _loss_inputs(seed=3)
    entropy = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3)) * 5
    entropy[~loss_mask.bool()] = float("inf")  # masked positions must not count, whatever they hold
    n = loss_mask.sum()
    without, _ = grpo_loss(logp, old, ref, advantages, loss_mask, n)
    loss, stats = grpo_loss(logp, old, ref, advantages, loss_mask, n, entropy=entropy, entropy_coef=0.01)
    mean_entropy = entropy[loss_mask.bool()].mean()
    assert loss.item() == pytest.approx((without - 0.01 * mean_entropy).item(), rel=1e-6)
    assert stats["entropy"] / n.item() == pytest.approx(mean_entropy.item(), rel=1e-6)


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


@pytest.mark.floor
def test_token_logprobs_of_a_padded_batch_equal_each_sequence_alone():
    model = random_qwen2()
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


def through_chunks(seed: int, pick, **settings):
    """token_logprobs of a random model made in chunks of 3 positions and in one: for each, the tensor
    `pick` takes from its output and the gradients of a weighted sum of it. Returns the model, its input
    and the two (tensor, gradients) results."""
    model = random_qwen2()
    input_ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    results = []
    for chunk in (3, 1000):
        model.zero_grad()
        out = pick(token_logprobs(model, input_ids, torch.ones_like(input_ids), response_start=4, chunk=chunk,
                                  **settings))                                         # (2, 8)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    return model, input_ids, results


@pytest.mark.floor
def test_chunked_logprobs_give_the_same_values_and_gradients_as_one_chunk():
    _, _, ((chunked, chunked_grads), (whole, whole_grads)) = through_chunks(1, lambda logp: logp)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked_grads, whole_grads))


def test_chunked_entropy_is_the_softmax_entropy_at_temperature_with_the_same_gradient_as_one_chunk():
    model, input_ids, ((chunked, chunked_grads), (whole, whole_grads)) = through_chunks(
        2, lambda out: out[1], temperature=0.7, with_entropy=True)
    with torch.no_grad():  # H = -sum_v p_v log p_v of softmax(logits / T), written out
        log_p = torch.log_softmax(model(input_ids).logits[:, 3:-1] / 0.7, dim=-1)
        expected = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(chunked, expected, atol=1e-5) and torch.allclose(whole, expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked_grads, whole_grads))


# =========================================================================================== ppo.py

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


# ========================================================================================== eval.py

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


# ======================== training: searchr1.train_step and train, checkpoints, bench.py gpu --tiny

def ppo_config(model_dir, folder, **overrides):
    return tiny_config(model_dir, folder, algo="ppo", batch_size=2, micro_batch_size=1, critic_lr=1e-2,
                       **overrides)


@pytest.mark.floor
def test_loading_the_4bit_policy_on_the_cpu_prints_no_warning(tiny_model_dir):
    code = ("import torch, policy, searchr1; cfg = searchr1.Config(model=%r, device='cpu'); "
            "tokenizer, model = policy.load_policy(cfg, torch.device('cpu')); "
            "model(input_ids=torch.tensor([[1, 2, 3]]))" % str(tiny_model_dir))  # a first 4-bit matmul
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # as a user runs it
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert printed == []


def saved_for_backward_per_token(layer, hidden_states, position_embeddings, frozen: set[int]) -> float:
    """Bytes autograd keeps for one decoder layer's backward, per token (saved-tensor hooks): every saved
    tensor counted once per storage, less the frozen weights and the layer's input (a checkpoint)."""
    saved = {}
    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in frozen:
            saved[key] = t.untyped_storage().nbytes()
        return t
    B, T, _ = hidden_states.shape
    positions = torch.arange(T)[None].expand(B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden_states, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    return sum(saved.values()) / (B * T)


@pytest.mark.floor
@pytest.mark.parametrize("hidden,intermediate,rank", [(64, 176, 8), (96, 200, 4)])
def test_the_update_terms_saved_activations_are_what_autograd_keeps_for_a_4bit_lora_layer(
        hidden, intermediate, rank, tmp_path):
    """plan.Shape.saved_bytes_per_token, the recomputed layer of the update term, against what the training
    path's layer (NF4 base, LoRA on every projection, bfloat16 compute) saves for its backward."""
    random_qwen2(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(tmp_path)
    cfg = searchr1.Config(model=str(tmp_path), device="cpu", dtype="bfloat16", lora_r=rank,
                          gradient_checkpointing=False)
    _, layered = policy.load_policy(cfg, torch.device("cpu"))
    layered.train()
    decoder = grpo.causal_lm(layered).model
    x = torch.randn(3, 40, hidden, dtype=torch.bfloat16, requires_grad=True)
    frozen = {t.untyped_storage().data_ptr() for t in [*layered.parameters(), *layered.buffers(), x]}
    rotary = decoder.rotary_emb(x, torch.arange(40)[None].expand(3, 40))
    measured = saved_for_backward_per_token(decoder.layers[0], x, rotary, frozen)
    planned = plan.Shape.of(layered.config).saved_bytes_per_token(rank, dtype_bytes=2)
    assert measured <= planned <= 1.1 * measured


@pytest.mark.floor
def test_a_training_step_on_4bit_lora_changes_only_the_adapter_and_uses_the_base_as_reference(
        tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    assert "Linear4bit" in type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__
    steered(monkeypatch, tokenizer)
    seen = []  # the (logp, ref_logp, loss_mask) of every micro-batch the loss sees
    def spy(logp, old_logp, ref_logp, advantages, loss_mask, *args):
        seen.append((logp.detach(), ref_logp, loss_mask))
        return grpo_loss(logp, old_logp, ref_logp, advantages, loss_mask, *args)
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    questions = load_qa(cfg.train_data)[:2]
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    assert stats["reward"] == 0.5 and stats["answered"] == 1.0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)

    # a second step: the adapter has moved, so policy and reference differ; the reference must be
    # exactly the base model, loaded afresh without any adapter
    seen.clear()
    searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    _, fresh = policy.load_policy(cfg, torch.device("cpu"))  # a new adapter adds exactly 0 (B = 0)
    chat = policy.uses_chat_template(cfg, tokenizer)  # as train_step prompts: Qwen2.5's template
    steered_prompts = [build_prompt(q["question"], tokenizer, chat) for q in questions]
    trajectories = rollout_chapter.rollout(model, tokenizer, steered_prompts, search, cfg.rollout_config())
    mb = grpo.pack(trajectories[:3], torch.zeros(3), tokenizer.pad_token_id, True, torch.device("cpu"))
    with torch.no_grad():
        base_logp = grpo.batch_logprobs(fresh, mb, 1.0)
    logp, ref_logp, mask = seen[0]
    in_loss = mask.bool()
    assert torch.allclose(ref_logp[in_loss], base_logp[in_loss], atol=1e-5)
    assert not torch.allclose(logp[in_loss], ref_logp[in_loss], atol=1e-3)


@pytest.mark.parametrize("mini_batch_size, micro_batches, optimizer_steps", [
    (8, [3, 3, 2], 1), (4, [3, 1, 3, 1], 2), (3, [3, 3, 2], 3), (2, [2, 2, 2, 2], 4)])
@pytest.mark.floor
def test_each_mini_batch_of_trajectories_is_one_optimizer_step_cut_into_micro_batches(
        mini_batch_size, micro_batches, optimizer_steps, tiny_model_dir, tmp_path, monkeypatch):
    # 2 questions x 4 = 8 trajectories a step, micro-batches of 3 (tiny_config)
    cfg = tiny_config(tiny_model_dir, tmp_path, load_4bit=False, mini_batch_size=mini_batch_size)
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    steered(monkeypatch, tokenizer)
    seen, steps = [], []
    def spy(logp, *args):
        seen.append(len(logp))
        return grpo_loss(logp, *args)
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    monkeypatch.setattr(optimizer, "step", lambda: steps.append(len(seen)))  # micro-batches seen by each step
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, load_qa(cfg.train_data)[:2], search, cfg,
                                torch.device("cpu"))
    assert seen == micro_batches and len(steps) == optimizer_steps
    assert sum(seen[:steps[0]]) == min(mini_batch_size, 8)  # the first step saw exactly one mini-batch
    assert stats["entropy"] > 0  # logged: the token mean of the bonus's entropy


def two_rank_config(model_dir, folder):
    """4 questions x 4 responses a step, 2 optimizer steps of 8 trajectories: with 2 ranks, 4 each."""
    return tiny_config(model_dir, folder, load_4bit=False, batch_size=4, mini_batch_size=8, steps=1, samples=2,
                       eval_size=2)


def _two_rank_child(rank: int, model_dir: str, folder: str, port: int):
    """A torchrun rank in miniature: the environment torchrun sets, then searchr1.train, steered."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    cfg = two_rank_config(model_dir, Path(folder))
    distributed.init(policy.pick_device(cfg))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steer_rollouts(setattr, functools.partial(rollout, logits_hook=answer_every_other(tokenizer)))
    try:
        searchr1.train(cfg)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.floor
def test_two_ranks_take_the_optimizer_step_one_process_takes_and_only_rank_0_writes(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """torchrun's data parallelism on the CPU (gloo): each rank rolls out half the questions, the token
    count and the LoRA gradients are summed over the ranks, and the adapter after the step is the one a
    single process makes on all the questions."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.start_processes(_two_rank_child, (str(tiny_model_dir), str(tmp_path / "two"), port),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish in 240 s")
    steered(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    one = two_rank_config(tiny_model_dir, tmp_path / "one")
    searchr1.train(one)
    from safetensors.torch import load_file
    two_run, one_run = tmp_path / "two" / "run", Path(one.out_dir)
    a = load_file(two_run / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    b = load_file(one_run / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    # up to floating point (each rank cuts its half of a mini-batch into its own micro-batches): 1e-3 of
    # one AdamW step at this lr, where a wrong sum (a mean, one rank's gradient) is a whole step off
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3 * one.lr) for k in a)
    assert any(not torch.equal(b[k], torch.zeros_like(b[k])) for k in b if "lora_B" in k)  # the step moved it
    rows = [json.loads(line) for line in (two_run / "metrics.jsonl").open()]  # one row: rank 0 alone wrote
    (expected,) = [json.loads(line) for line in (one_run / "metrics.jsonl").open()]
    samples = runs.rows(two_run / "samples.jsonl")
    assert len(rows) == 1 and sum(r["seeded"] for r in samples) == 2
    for key in ("reward", "policy_loss", "kl", "searches", "response_len"):
        assert rows[0][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.mark.floor
def test_sampling_from_the_merged_copy_gives_the_adapters_greedy_tokens_and_log_probs(tiny_model_dir):
    """--rollout-weights merged: W = dequantize(W_nf4) + (alpha / r) B A in one plain weight samples what
    the 4-bit base with its unmerged adapter samples, and shares the embeddings and norms with it."""
    cfg = searchr1.Config(model=str(tiny_model_dir), device="cpu")
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = prompts_for(tokenizer, ["who", "what is the tallest mountain on earth", "when did it happen"])
    cfg_rollout = rollout_cfg(max_turns=1, max_new_tokens=12, max_obs_tokens=10, temperature=0.0, n_samples=1)
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    adapter = rollout(model, tokenizer, prompts, search, cfg_rollout)
    with policy.sampling_model(model, dataclasses.replace(cfg, rollout_weights="merged"), torch.device("cpu")) as copy:
        assert not any("lora" in name for name, _ in copy.named_parameters())
        shared = {p.data_ptr() for p in model.parameters()}
        assert copy.get_input_embeddings().weight.data_ptr() in shared
        merged = rollout(copy, tokenizer, prompts, search, cfg_rollout)
    with model.disable_adapter():  # the base alone, B A left out
        base = rollout(model, tokenizer, prompts, search, cfg_rollout)
    assert [t.response_ids for t in merged] == [t.response_ids for t in adapter]
    for a, b, c in zip(adapter, merged, base):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
        assert (torch.tensor(c.logprobs[:3]) - torch.tensor(a.logprobs[:3])).abs().max() > 1e-3  # B A counts


def test_on_gpus_the_scalar_sums_and_barriers_go_through_a_backend_that_serves_cpu_tensors(tmp_path):
    """NCCL reduces only CUDA tensors, so a group of NCCL alone fails at the first sum of a Python number
    (a gloo group that serves CUDA tensors only stands in for it here). The group made for GPU ranks has
    a CPU backend beside NCCL (here gloo for both), and the sums and barriers go through it."""
    def group(backend: str, name: str):
        store = torch.distributed.FileStore(str(tmp_path / name), 1)
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    group("cuda:gloo", "nccl-alone")
    try:
        with pytest.raises(RuntimeError, match="cpu"):
            distributed.all_sum(2.5)
    finally:
        torch.distributed.destroy_process_group()
    group(distributed.backend("cuda").replace("nccl", "gloo"), "gpu-ranks")
    try:
        assert distributed.all_sum(2.5) == 2.5
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_a_tokenizer_without_a_pad_token_trains_as_llama3s_does(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path, load_4bit=False)
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    tokenizer.pad_token = None  # Llama 3's tokenizers have none
    assert tokenizer.pad_token_id is None
    steered(monkeypatch, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, load_qa(cfg.train_data)[:2], search, cfg,
                                torch.device("cpu"))
    assert stats["reward"] == 0.5 and math.isfinite(stats["policy_loss"])


@pytest.mark.floor
def test_old_logprobs_from_the_rollout_save_one_pass_and_give_the_recomputed_loss(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """--old-logprobs rollout trains with the log-probs the sampler recorded: one forward pass a
    micro-batch fewer, and in float32 the same loss as recomputing them (the drift in 4-bit on a GPU
    is what bench.py gpu measures)."""
    seen = {}
    for setting in ("recompute", "rollout"):
        cfg = tiny_config(tiny_model_dir, tmp_path / setting, load_4bit=False, old_logprobs=setting)
        torch.manual_seed(0)  # the same LoRA A matrices
        tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
        steered(monkeypatch, tokenizer)
        passes = []
        monkeypatch.setattr(searchr1, "batch_logprobs", lambda *a, **k: passes.append(1) or grpo.batch_logprobs(*a, **k))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
        stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, load_qa(cfg.train_data)[:2], search,
                                          cfg, torch.device("cpu"))
        seen[setting] = len(passes), stats
    (recomputed, a), (recorded, b) = seen["recompute"], seen["rollout"]
    assert recomputed == 2 * 4 and recorded == 4  # pi_old and pi_ref for each of 4 micro-batches, or pi_ref only
    for key in ("policy_loss", "kl", "clip_frac", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(cli.UsageError, match="needs retrieved-token masking"):
        searchr1.Config(old_logprobs="rollout", mask_observations=False).check()


def test_the_compute_dtype_follows_the_device_and_a_flag_overrides_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert policy.pick_dtype(searchr1.Config(), cpu)[0] == torch.float32
    # a T4 (compute capability 7.5) emulates bfloat16: torch's check says yes unless emulation is left out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    dtype, why = policy.pick_dtype(searchr1.Config(), cuda)
    assert dtype == torch.float16 and "Tesla T4 has no bfloat16" in why and "loss scaling" in why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert policy.pick_dtype(searchr1.Config(), cuda)[0] == torch.bfloat16
    assert policy.pick_dtype(searchr1.Config(dtype="float32"), cuda) == (torch.float32, "--dtype float32")


@pytest.mark.floor
def test_a_float16_step_scales_its_loss_and_keeps_the_adapter_and_optimizer_in_float32(
        tiny_model_dir, tmp_path, monkeypatch):
    """What the CPU can check of the float16 path (T4, V100): the base computes in float16, LoRA
    weights stay float32, the GradScaler scales the loss and unscales before clipping, and the step
    updates the adapter. Only a GPU shows float16 kernels' speed and overflow behaviour at scale."""
    cfg = tiny_config(tiny_model_dir, tmp_path, load_4bit=False, dtype="float16")
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.float16
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    steered(monkeypatch, tokenizer)
    optimizer = torch.optim.AdamW(list(lora.values()), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = []
    real_scale = scaler.scale
    monkeypatch.setattr(scaler, "scale", lambda loss: scaled.append(loss.item()) or real_scale(loss))
    before = {n: p.detach().clone() for n, p in lora.items()}
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, load_qa(cfg.train_data)[:2], search,
                                      cfg, torch.device("cpu"), scaler)
    assert len(scaled) == 4 and all(math.isfinite(x) for x in scaled)  # one loss a micro-batch (3 + 1, 3 + 1)
    assert scaler.get_scale() == 2.0**10 and math.isfinite(stats["grad_norm"])  # no overflow: no step skipped
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_the_time_plan_counts_every_step_left_and_each_evaluation_by_its_rollout_calls():
    """After the first step: 49 more steps of 120 s, and evaluations at steps 25 and 50, each 7 greedy
    calls (200 questions in batches of 32) as long as one of the step's 2 rollout calls (30 s)."""
    stats = {"step_s": 120.0, "rollout_s": 60.0, "logprob_s": 25.0, "update_s": 35.0}
    cfg = searchr1.Config(rollout_batch_size=27)
    text = runs.time_plan(stats, cfg, start=0, questions=32)
    assert "rollout 60 s in 2 calls of up to 27 questions" in text and "an evaluation ~3.5 min" in text
    assert text.endswith("~1.8 h more for the 49 steps and 2 evaluations left")  # (49 x 120 + 2 x 210) / 3600
    tiny = runs.time_plan({"step_s": 1.2, "rollout_s": 0.4, "logprob_s": 0.2, "update_s": 0.5},
                          searchr1.Config(steps=20, eval_every=5, eval_size=200, eval_batch_size=256,
                                          rollout_batch_size=16), start=0, questions=16)
    assert tiny.startswith("time plan: a step takes 1.2 s (rollout 0.4 s in 1 call")  # not "0.0 min"
    assert tiny.endswith("~24 s more for the 19 steps and 4 evaluations left")  # 19 x 1.2 + 4 x 0.4


def test_the_critic_warms_up_over_its_own_shorter_share_of_the_steps():
    cfg = searchr1.Config(steps=1000, warmup_ratio=0.285, critic_warmup_ratio=0.015)  # 285 and 15 steps
    actor, critic = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [actor], "lr": 1.0}, {"params": [critic], "lr": 10.0}])
    scheduler = searchr1.make_scheduler(optimizer, cfg, cfg.steps)
    lrs = []
    for _ in range(300):
        lrs.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx([1 / 285, 10 / 15]) and lrs[14] == pytest.approx([15 / 285, 10.0])
    assert lrs[284] == pytest.approx([1.0, 10.0]) and lrs[299] == pytest.approx([1.0, 10.0])
    grpo_only = torch.optim.AdamW([actor], lr=1.0)  # GRPO: one group, the actor's schedule
    assert searchr1.make_scheduler(grpo_only, cfg, cfg.steps).get_last_lr() == pytest.approx([1 / 285])


@pytest.mark.floor
def test_a_ppo_step_changes_only_the_two_adapters_and_the_value_head(tiny_model_dir, tmp_path, monkeypatch):
    cfg = ppo_config(tiny_model_dir, tmp_path)
    assert cfg.samples_per_question == 1  # --algo ppo: one response per question
    tokenizer, model = policy.load_policy(cfg, torch.device("cpu"))
    steered(monkeypatch, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(ppo.param_groups(model, cfg.lr, cfg.critic_lr))
    questions = load_qa(cfg.train_data)[:2]
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    stats, _, _ = searchr1.train_step(model, tokenizer, optimizer, questions, search, cfg, torch.device("cpu"))
    assert stats["reward"] == 0.5  # rows answer y, z
    for key in ("value_loss", "explained_variance", "value_clip_frac", "policy_loss", "kl"):
        assert key in stats and stats[key] == stats[key], key  # present and not nan
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert any("lora_B.default" in k for k in changed)
    assert any("lora_B.critic" in k for k in changed)
    assert {"value_head.weight", "value_head.bias"} <= changed
    assert all("lora_" in k or k.startswith("value_head.") for k in changed)  # the 4-bit base is untouched
    assert model.active_adapter == "default"  # the next rollout samples from the policy


def straight_and_resumed_runs(straight, crashed, monkeypatch):
    """Train `straight` for its steps; train `crashed` until its second step dies, then --resume it.

    Returns both configs and both runs' metrics rows."""
    searchr1.train(straight)
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
    return straight, crashed, rows, resumed


@pytest.mark.parametrize("make_config, logged, saved", [
    (tiny_config, ("reward", "policy_loss", "kl", "grad_norm", "lr"), ("adapter_model.safetensors",)),
    (ppo_config, ("reward", "policy_loss", "value_loss", "explained_variance", "value_clip_frac", "kl", "grad_norm"),
     ("adapter_model.safetensors", "critic/adapter_model.safetensors", "value_head.safetensors")),
], ids=["grpo", "ppo"])
@pytest.mark.floor
def test_resumed_run_takes_the_same_next_step_as_an_uninterrupted_one(make_config, logged, saved, tiny_model_dir,
                                                                       tmp_path, monkeypatch):
    """Killed in its second step and resumed, a run logs and saves what the uninterrupted run does:
    the policy adapter, and for PPO the critic adapter and value head too."""
    from transformers import AutoTokenizer
    steered(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    straight, crashed, rows, resumed = straight_and_resumed_runs(
        make_config(tiny_model_dir, tmp_path / "straight"), make_config(tiny_model_dir, tmp_path / "crashed"),
        monkeypatch)
    assert [r["step"] for r in resumed] == [1, 2]
    for key in logged:
        assert resumed[1][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-9), key
    assert rows[1]["kl"] > 0  # the step after the first really depends on the restored adapter
    from safetensors.torch import load_file
    for name in saved:
        a = load_file(Path(straight.out_dir) / "checkpoints" / "step-000002" / name)
        b = load_file(Path(crashed.out_dir) / "checkpoints" / "step-000002" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (checkpoints included), by relative path."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.mark.floor
def test_export_merges_a_runs_adapter_into_a_plain_model_that_samples_the_adapters_greedy_tokens(finished_run,
                                                                                                 tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "merged"
    argv = ["export", "--model", finished_run.model, "--adapter", finished_run.out_dir, "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]
    assert searchr1.main(argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers model: no peft, no adapter
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer, adapted = agent.load_agent(finished_run, finished_run.out_dir, torch.device("cpu"))
    prompts = prompts_for(tokenizer, ["question 0", "question 1"])
    greedy = finished_run.rollout_config(greedy=True)
    search = lambda queries: ["Doc 1(Title: T) text"] * len(queries)
    by_adapter = rollout(adapted, tokenizer, prompts, search, greedy)
    by_merged = rollout(merged, tokenizer, prompts, search, greedy)
    assert [t.response_ids for t in by_merged] == [t.response_ids for t in by_adapter]


def test_a_folder_that_holds_a_run_is_never_overwritten_without_resume_or_overwrite(finished_run):
    run = Path(finished_run.out_dir)
    before = run_files(run)
    with pytest.raises(cli.UsageError, match="holds a run already: continue it with --resume, or start "
                                                  "it over with --overwrite"):
        searchr1.train(finished_run)
    assert run_files(run) == before  # not a byte lost
    with pytest.raises(cli.NothingToDo, match="at step 2 of --steps 2: nothing to do"):
        searchr1.train(replace(finished_run, resume=True))
    assert run_files(run) == before
    searchr1.train(replace(finished_run, overwrite=True, steps=1))  # starts over: one step, one checkpoint
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001"]


def test_resume_of_a_folder_with_no_checkpoint_stops_before_any_work(tmp_path):
    cfg = searchr1.Config(out_dir=str(tmp_path / "empty"), resume=True)
    with pytest.raises(cli.UsageError, match=r"--resume: no checkpoint in .*empty \(looked for .*latest.json\)"):
        runs.check_run_folder(tmp_path / "empty", cfg)
    assert not (tmp_path / "empty").exists()  # nothing made


def test_resume_stops_naming_every_setting_that_changes_what_the_run_computes(finished_run):
    changed = replace(finished_run, resume=True, steps=3, lr=5e-3, seed=7, micro_batch_size=1, eval_every=1)
    with pytest.raises(cli.UsageError) as error:
        searchr1.train(changed)
    message = str(error.value)  # steps may grow; micro-batching and reporting may change; lr and seed may not
    assert "--lr 0.01 -> 0.005" in message and "--seed 0 -> 7" in message
    assert "--steps" not in message and "--micro-batch-size" not in message and "--eval-every" not in message


def test_resuming_forgets_the_log_rows_after_the_checkpoint_and_a_line_a_kill_cut_short(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"step": 2, "path": "step-000002"}')
    rows = "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "rew')  # killed mid-line
    runs.start(tmp_path, searchr1.Config(resume=True))
    assert [row["step"] for row in runs.rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_every_checkpoint_stays_unless_only_the_newest_k_are_asked_for(finished_run, tmp_path):
    run = Path(finished_run.out_dir)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    kept = replace(finished_run, out_dir=str(tmp_path / "kept"), steps=3, keep_checkpoints=2)
    searchr1.train(kept)
    assert sorted(p.name for p in (tmp_path / "kept" / "checkpoints").glob("step-*")) == ["step-000002",
                                                                                        "step-000003"]
    assert json.loads((tmp_path / "kept" / "checkpoints" / "latest.json").read_text())["step"] == 3


def test_the_best_held_out_em_checkpoint_stays_whatever_keep_checkpoints_and_a_command_can_take_it(
        finished_run, tmp_path, capsys):
    """--eval-every 1: held-out EM after every step; best.json names the first step that reached the
    best (the steered policy scores 0.5 every time: step 1), and --keep-checkpoints 1 keeps it beside
    the newest. A run folder given to export (eval and ask alike) takes its latest checkpoint, or
    --checkpoint best, and says on stderr which it took."""
    cfg = replace(finished_run, out_dir=str(tmp_path / "best"), steps=3, eval_every=1, keep_checkpoints=1)
    searchr1.train(cfg)
    root = tmp_path / "best" / "checkpoints"
    assert [r["eval_em"] for r in runs.rows(tmp_path / "best" / "metrics.jsonl")] == [0.5, 0.5, 0.5]
    assert json.loads((root / "best.json").read_text()) == {"step": 1, "path": "step-000001", "eval_em": 0.5}
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000001", "step-000003"]
    said = {}
    for which in ("latest", "best"):
        argv = ["export", "--model", cfg.model, "--adapter", cfg.out_dir, "--checkpoint", which, "--out",
                str(tmp_path / f"exported-{which}"), "--device", "cpu", "--dtype", "float32"]
        assert searchr1.main(argv) == 0
        said[which] = capsys.readouterr().err
    assert "step-000003, the run's latest: step 3 (the best, EM 0.500, is step 1: --checkpoint best)" in said["latest"]
    assert "step-000001, the run's best: step 1, held-out EM 0.500 (its best)" in said["best"]
    unevaluated = tmp_path / "unevaluated" / "checkpoints"  # a run saved before its first evaluation
    unevaluated.mkdir(parents=True)
    (unevaluated / "latest.json").write_text('{"step": 1, "path": "step-000001"}')
    with pytest.raises(cli.UsageError, match="has no best.json yet"):
        runs.checkpoint_folder(str(unevaluated.parent), "best")


def test_report_to_tensorboard_and_wandb_logs_every_step_offline_and_a_missing_package_says_how_to_install_it(
        finished_run, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays in <run>/wandb
    cfg = replace(finished_run, out_dir=str(tmp_path / "reported"), report_to="tensorboard,wandb")
    searchr1.train(cfg)
    run = tmp_path / "reported"
    logged = runs.rows(run / "metrics.jsonl")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    for key in ("reward", "kl", "format_ok", "policy_tokens", "eval_em"):
        expected = [(r["step"], r[key]) for r in logged if key in r]
        points = [(e.step, e.value) for e in events.Scalars(key)]  # float32 in the event files
        assert [step for step, _ in points] == [step for step, _ in expected] and expected
        assert [value for _, value in points] == pytest.approx([value for _, value in expected], rel=1e-6)
    (offline,) = (run / "wandb").glob("offline-run-*")
    listed = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
                            capture_output=True, text=True, timeout=120)
    history = [json.loads(line)["history"]["item"] for line in listed.stdout.splitlines()
               if json.loads(line)["type"] == "history"]
    assert [h["_step"] for h in history] == [r["step"] for r in logged]
    assert [h["reward"] for h in history] == [r["reward"] for r in logged]
    assert [h["format_ok"] for h in history] == [r["format_ok"] for r in logged]
    for package, modules in (("tensorboard", ["tensorboard", "torch.utils.tensorboard"]), ("wandb", ["wandb"])):
        for module in modules:  # as if it were not installed
            monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(cli.UsageError, match=f"pip install {package}"):
            runs.Reporters(run, replace(cfg, report_to=package), start=0)


def test_samples_show_what_the_policy_wrote_and_what_the_search_returned_and_each_eval_is_saved(finished_run):
    from transformers import AutoTokenizer
    run = Path(finished_run.out_dir)
    rows = [json.loads(line) for line in (run / "samples.jsonl").open()]
    assert [r["step"] for r in rows if r["seeded"]] == [1, 1, 2, 2]  # 2 a step, a seeded choice
    # beside them, what trips a health check: the steered answers skip <think> (health.follows_format)
    assert all("bad_format" in r["flagged"] for r in rows if not r["seeded"]) and len(rows) > 4
    questions = {q["question"]: q["golden_answers"] for q in load_qa(finished_run.train_data)}
    for r in rows:
        assert r["golden_answers"] == questions[r["question"]]
        # the steered policy answers at once: one segment the policy wrote, no search
        assert [s["by"] for s in r["segments"]] == ["policy"] and r["queries"] == []
        assert r["answer"] in ("y", "z") and r["reward"] == float(r["answer"] == "y")
    tokenizer = AutoTokenizer.from_pretrained(finished_run.model)
    searching = Trajectory(prompt_ids=[1], response_ids=[], loss_mask=[], queries=["q"])
    for by, text in (("policy", "<search> q </search>"), ("search", "\n\n<information>Doc 1</information>\n\n"),
                     ("policy", "<answer> y </answer>")):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        searching.response_ids += ids
        searching.loss_mask += [int(by == "policy")] * len(ids)
    searching.text = tokenizer.decode(searching.response_ids)
    (row,) = runs.sample_rows(1, [{"question": "q?", "golden_answers": ["y"]}], [searching], torch.ones(1),
                                  tokenizer, replace(finished_run, group_size=1))
    assert [(s["by"], s["text"]) for s in row["segments"]] == [
        ("policy", "<search> q </search>"), ("search", "\n\n<information>Doc 1</information>\n\n"),
        ("policy", "<answer> y </answer>")]
    assert row["answer"] == "y" and row["queries"] == ["q"] and row["reward"] == 1.0
    saved = json.loads((run / "eval" / "step-000002.json").read_text())  # the last step evaluates
    assert saved["em"] == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval_em"]
    assert len(saved["predictions"]) == finished_run.eval_size and "response" in saved["predictions"][0]


def test_bench_gpu_tiny_times_a_real_grpo_step_and_the_merged_copy_and_writes_each_phase_as_it_ends(
        monkeypatch, capsys, tmp_path):
    results, written = [], []  # main() dispatches to bench.bench_gpu; keep what it returns and each JSON write
    real_bench_gpu, real_write = bench.bench_gpu, runs.write_atomic
    monkeypatch.setattr(bench, "bench_gpu", lambda args: results.append(real_bench_gpu(args)))
    def write(path, text):
        written.append(list(json.loads(text)["phases"]))
        real_write(path, text)
    monkeypatch.setattr(runs, "write_atomic", write)
    # one rollout chunk of 2 questions x 2 samples, 3 turns of 12 forced tokens
    monkeypatch.setattr(sys, "argv", ["bench.py", "gpu", "--tiny", "--profile", "--profile-rows", "5",
                                      "--json", str(tmp_path / "gpu.json")])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)  # --tiny runs on one thread; the rest of the session keeps its own
    (r,) = results
    out = capsys.readouterr().out
    # the JSON holds every phase so far after each of them: a run cut short keeps what it measured
    assert written == [["setup"], ["setup", "step"], ["setup", "step", "merged"],
                       ["setup", "step", "merged", "generate"], ["setup", "step", "merged", "generate", "run"]]
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["phases"].keys() == r["phases"].keys() and saved["setting"] == r["setting"]  # what was measured how
    generate, step, merged, run = (r["phases"][phase] for phase in ("generate", "step", "merged", "run"))
    # rollout.py and model.generate sampled the very same tokens on the comparison's chunk
    assert generate["same_tokens"] is True and generate["ratio"] > 0
    # train_step's rollout (one call: the plan's chunk) sampled exactly the script
    assert step["questions"] == 2 and step["sampled_tokens"] == step["forced_tokens"] == 2 * 2 * 3 * 12
    # the sampler's log-probs against the trainer's pass: in float32 on the CPU they agree (4-bit on a GPU may not)
    assert 0 <= step["logp_drift"] <= step["logp_drift_max"] < 1e-4
    # each chunk's last turns answer "yes" (the golden answer) then "no": reward 0.5, so the update has a
    # gradient, and it moved the LoRA weights and nothing else
    assert step["reward"] == 0.5 and step["changed_lora"] > 0 and step["changed_frozen"] == 0
    # the phases are real, positive, and make up the step
    assert all(step[key] > 0 for key in ("rollout_s", "logprob_s", "update_s", "peak_gb"))
    assert step["rollout_s"] + step["logprob_s"] + step["update_s"] == pytest.approx(step["step_s"])
    assert merged["questions"] == 2 and merged["rollout_s"] > 0 and merged["copy_s"] >= 0
    # the default run: 32 questions in 16 calls of the measured chunk, the log-prob and update passes x 16
    assert run["rollout_calls"] == 16
    assert run["step_s"] == pytest.approx(16 * step["rollout_s"] + 16 * (step["logprob_s"] + step["update_s"]))
    assert run["steps_in_3h"] == pytest.approx(3 * 3600 / run["step_s"])
    for phase in ("generate (", "step (", "merged (", "the default run's step", "targets: peak memory"):
        assert sum(line.startswith(phase) for line in out.splitlines()) == 1, phase
    assert "OUT OF MEMORY" not in out and r["out_of_memory"] == []
    # --profile: one more step under torch.profiler, its top ops
    assert "profile of one more train_step" in out and "aten::" in out


def test_the_gpu_bench_caps_memory_on_an_indexed_device(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction(fraction, device) needs a device with an index
    (torch.device("cuda") has none and raises ValueError): the bench measures the current GPU by its index."""
    from torch.cuda._utils import _get_device_index  # the check set_per_process_memory_fraction makes first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    device = bench.gpu_device(bench.argparse.Namespace(tiny=False))
    assert device == torch.device("cuda", 3) and _get_device_index(device) == 3
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))


def test_the_gpu_check_script_runs_its_path_on_the_cpu_and_leaves_each_caps_results(tmp_path):
    """bench-gpu.sh as a lent GPU runs it, at tiny sizes on the CPU (SEARCHR1_BENCH_CPU=1: no CUDA check,
    no tiny task): both caps run, each leaving its table and its JSON in $OUT."""
    done = subprocess.run(["bash", "bench-gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path), "SEARCHR1_BENCH_CPU": "1",
                               "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-16.json", "gpu-16.txt", "gpu-24.json", "gpu-24.txt"]
    full, step_only = (json.loads((tmp_path / f"gpu-{cap}.json").read_text())["phases"] for cap in (24, 16))
    assert list(full) == ["setup", "step", "merged", "generate", "run"] and list(step_only) == ["setup", "step", "run"]
    assert "the default run's step" in (tmp_path / "gpu-16.txt").read_text()


def test_bench_plan_prints_the_default_runs_plan_for_24_and_16_gb_cards(capsys):
    plans = bench.main(["plan"])
    out = capsys.readouterr().out
    assert [p.gpu_gb for p in plans] == [24, 16] and all(p.fits for p in plans)
    assert plans[0].peak_gb < 20 and plans[1].peak_gb <= 14
    assert out.count("memory plan for") == 2 and f"--micro-batch-size {plans[1].micro_batch_size}" in out


def test_a_phase_that_runs_out_of_memory_is_recorded_with_its_sizes_peak_and_line_and_the_bench_goes_on():
    from grpo import token_logprobs
    def model_out_of_memory(**inputs):  # a log-prob pass whose model call runs out of GPU memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.68 GiB\nof which 1 GiB is free")
    ids = torch.ones(1, 4, dtype=torch.long)
    failures = []
    class OutOfMemoryModel:
        def get_decoder(self):
            return model_out_of_memory
    failing_pass = lambda: token_logprobs(OutOfMemoryModel(), ids, torch.ones_like(ids), 2)  # noqa: E731
    sizes = {"questions": 27, "micro_batch_size": 10}
    assert bench._measure("step", failing_pass, torch.device("cpu"), sizes, failures) is None
    (failure,) = failures
    assert failure["phase"] == "step" and failure["sizes"] == sizes and failure["peak_gb"] > 0
    assert failure["where"].startswith("grpo.py:") and "get_decoder()(" in failure["where"]
    assert failure["error"] == "CUDA out of memory. Tried to allocate 10.68 GiB"  # the message's first line
    result, seconds, peak_gb = bench._measure("a pass that fits", lambda: 42, torch.device("cpu"), sizes, failures)
    assert (result, len(failures)) == (42, 1) and seconds >= 0 and peak_gb > 0


# =================== tiny.py: the learning proof, and the tiny agent taken away (ask, eval, export)

SMALL = {1: tiny.TinyTask(entities=40, held_out=15), 2: tiny.TinyTask(hops=2, entities=40, cities=20, held_out=30)}


@pytest.fixture(scope="module", params=[1, 2], ids=["single-hop", "multi-hop"])
def small_task(request, tmp_path_factory):
    """Knowledge base, BM25 search and tokenizer of a 40-entity task (no warm-up: it is slow),
    single-hop and multi-hop."""
    task = SMALL[request.param]
    corpus_rows, train, test = tiny.make_knowledge_base(task)
    folder = tmp_path_factory.mktemp("tiny")
    tiny.write_jsonl(folder / "corpus.jsonl", corpus_rows)
    index = BM25Index.open(folder / "corpus.jsonl", index_dir=folder / "index")
    search = lambda queries: [format_passages(hits) for hits in index.search(queries, k=3)]
    tokenizer = tiny.train_tokenizer(tiny.vocabulary_texts(train + test, search))
    return {"task": task, "corpus": corpus_rows, "train": train, "test": test, "index": index, "search": search,
            "tokenizer": tokenizer}


def asked(q: dict) -> tuple[str, str]:
    """(subject of the question, attribute it asks): ('Bavoki', 'color') or, two hops, ('Bavoki', 'sport')."""
    return q["lookups"][0][0], q["lookups"][-1][1]


def test_held_out_questions_are_never_asked_in_training_but_their_names_are(small_task):
    task, train, test = small_task["task"], small_task["train"], small_task["test"]
    hops = lambda rows: [q for q in rows if len(q["lookups"]) == task.hops]  # noqa: E731
    assert len(test) == task.held_out and len(hops(test)) == len(test)
    assert len(hops(train)) == (3 * task.entities - task.held_out if task.hops == 1 else 2 * task.entities)
    assert not {asked(q) for q in train} & {asked(q) for q in test}
    assert {q["question"] for q in train}.isdisjoint(q["question"] for q in test)
    trained = {lookup[0] for q in train for lookup in q["lookups"]}  # names a training question looks up
    assert {lookup[0] for q in test for lookup in q["lookups"]} <= trained
    if task.hops == 2:  # the city fact a held-out question needs: no training question looks it up
        looked_up = {tuple(lookup) for q in train for lookup in q["lookups"]}
        assert {tuple(q["lookups"][0]) for q in test} <= looked_up
        assert not {tuple(q["lookups"][1]) for q in test} & looked_up


def test_invented_names_are_never_words_the_task_uses():
    names = {name.lower() for name in tiny.invent_names(random.Random(0), 3000)}
    values = {value.lower() for values in tiny.ALL_VALUES.values() for value in values}
    assert len(names) == 3000 and not names & (values | set(tiny.ALL_VALUES) | {"the", "is", "what"})


def test_the_same_seed_makes_the_same_task_and_another_seed_another():
    for task in SMALL.values():
        assert tiny.make_knowledge_base(task) == tiny.make_knowledge_base(task)
        assert tiny.make_knowledge_base(replace(task, seed=1))[1] != tiny.make_knowledge_base(task)[1]


def test_every_lookup_is_only_in_the_corpus_and_its_query_retrieves_it_first(small_task):
    by_id = {row["id"]: row["contents"] for row in small_task["corpus"]}
    for q in small_task["train"] + small_task["test"]:
        assert q["golden_answers"] == [q["lookups"][-1][2]]
        for lookup in map(tiny.lookup_fields, q["lookups"]):
            assert lookup["value"] not in q["question"]
            best = small_task["index"].search([tiny.QUERY.format(**lookup)], k=3)[0][0]
            assert by_id[best["id"]].endswith(tiny.PASSAGE.format(**lookup))


def test_every_two_hop_question_needs_exactly_two_passages_and_no_single_one_answers_it():
    """Bavoki's passage names the city but not the answer; the city's passage has the answer but
    not Bavoki; the two chained give it, and they are the only passages for their facts."""
    corpus, train, test = tiny.make_knowledge_base(SMALL[2])
    facts = {}  # (subject, attribute) -> [value, ...] as the passages state them
    for row in corpus:
        stated = re.fullmatch(r'"\w+"\nThe (\w+) of (\w+) is (\w+)\.', row["contents"])
        subject, attribute, value = stated.group(2, 1, 3)
        facts.setdefault((subject, attribute), []).append(value)
    two_hop = [q for q in train + test if len(q["lookups"]) == 2]
    assert len(two_hop) == 2 * SMALL[2].entities + SMALL[2].held_out
    for q in two_hop:
        entity, attribute = asked(q)
        [city] = facts[entity, "city"]                         # one passage gives the city ...
        [answer] = facts[city, attribute]                      # ... one passage of that city the answer
        assert [answer] == q["golden_answers"] and city not in q["question"]
        assert not facts.get((entity, attribute))              # the entity has no such fact of its own
        alone = [row for row in corpus if entity in row["contents"] and answer in row["contents"]]
        assert alone == []                                     # no passage has both the entity and the answer
    # and the city matters: an attribute's value differs between cities
    cities = {q["lookups"][1][0] for q in two_hop}
    assert 1 < len(cities) <= SMALL[2].cities and not cities & {q["lookups"][0][0] for q in two_hop}
    for attribute in tiny.CITY_VALUES:
        assert len({facts[city, attribute][0] for city in cities}) > 1


def test_tokenizer_round_trips_prompt_tags_and_passages_exactly(small_task, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = small_task["tokenizer"]
    q = small_task["test"][0]
    texts = [tokenizer.decode(build_prompt(q["question"], tokenizer, False)), INVALID_ACTION]
    for text, query in tiny.script(q, len(q["lookups"])):
        texts += [text] + ([observation(small_task["search"]([query])[0])] if query else [])
    tokenizer.save_pretrained(tmp_path)
    for t in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        for text in texts:
            assert t.decode(t.encode(text, add_special_tokens=False)) == text
        for tag in tiny.TAGS:  # one token each, and kept by skip_special_tokens
            ids = t.encode(tag, add_special_tokens=False)
            assert len(ids) == 1 and t.decode(ids, skip_special_tokens=True) == tag
    # a name is one token, so copying it into a query is one step
    for lookup in q["lookups"]:
        assert len(tokenizer.encode(" " + lookup[0], add_special_tokens=False)) == 1


def test_decoded_turns_are_what_the_rollout_and_the_reward_look_for(small_task):
    tokenizer = small_task["tokenizer"]
    q = small_task["train"][0]
    decode = lambda text: tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    *searches, (answer_turn, _) = tiny.script(q, len(q["lookups"]))
    for search_turn, query in searches:
        assert decode(search_turn).endswith(STOP_STRINGS[0]) and parse_action(decode(search_turn)) == ("search", query)
    assert decode(answer_turn).endswith(STOP_STRINGS[1])
    assert exact_match(extract_answer(decode(answer_turn)), q["golden_answers"]) == 1.0


def test_warm_up_trajectory_is_laid_out_as_the_rollout_lays_it_out(small_task):
    """Every lookup: the search turn trained on, its observation not; then the reading answer. Or
    one lookup short, and a guess of the last lookup's attribute."""
    tokenizer, search = small_task["tokenizer"], small_task["search"]
    q = next(q for q in small_task["train"] if len(q["lookups"]) == small_task["task"].hops)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt, response, loss_mask = tiny.warmup_example(q, tokenizer, search, random.Random(0), 1.0)
    assert prompt == build_prompt(q["question"], tokenizer, False)
    expected, expected_mask, read = [], [], ""
    for lookup in map(tiny.lookup_fields, q["lookups"]):
        written = encode(tiny.SEARCH.format(read=read, **lookup))
        info = encode(observation(search([tiny.QUERY.format(**lookup)])[0]))
        expected += written + info
        expected_mask += [1] * len(written) + [0] * len(info)   # observation: not trained
        read = tiny.SAID.format(**lookup)
    last = encode(tiny.READ.format(read=read, value=q["golden_answers"][0]))
    assert response == expected + last and loss_mask == expected_mask + [1] * len(last)
    _, response, loss_mask = tiny.warmup_example(q, tokenizer, search, random.Random(0), 0.0)
    text = tokenizer.decode(response)
    assert text.count("<search>") == small_task["task"].hops - 1 and text.count("I know the") == 1
    action, guess = parse_action(text.split("</information>")[-1])  # the last turn
    assert action == "answer" and guess in tiny.ALL_VALUES[q["lookups"][-1][1]]
    observations = [encode(observation(search([tiny.QUERY.format(**tiny.lookup_fields(lookup))])[0]))
                    for lookup in q["lookups"][:-1]]
    assert [t for t, m in zip(response, loss_mask) if not m] == sum(observations, [])


@pytest.mark.floor
def test_shared_prefix_warm_up_loss_equals_the_loss_over_full_sequences(small_task):
    """The warm-up runs the prompts' common prefix once; the loss must not change."""
    tokenizer, search = small_task["tokenizer"], small_task["search"]
    model = tiny.tiny_qwen2(tokenizer, tiny.TinyTask(hidden=32))
    rng = random.Random(0)
    batch = [tiny.warmup_example(q, tokenizer, search, rng, 0.5)
             for q in small_task["train"][:6]]
    total, n = 0.0, 0
    for prompt, response, mask in batch:  # the plain way: each full sequence on its own
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = logits[len(prompt) - 1: -1].log_softmax(-1)                      # (R, V)
        nll = -logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)
        total, n = total + (nll * torch.tensor(mask)).sum(), n + sum(mask)
    shared = tiny.warmup_loss(model, batch, tokenizer.pad_token_id)
    torch.testing.assert_close(shared, total / n, rtol=1e-5, atol=1e-5)


def test_model_tiny_with_algo_ppo_samples_as_many_trajectories_a_step_as_grpo(monkeypatch):
    """`--model tiny` picks the TINY defaults; with --algo ppo (n = 1) TINY_PPO's batch gives the
    same trajectories a step as GRPO's questions x group; a flag on the command line still wins;
    --model tiny-multihop picks the same defaults."""
    seen = []
    monkeypatch.setitem(searchr1.COMMANDS, "train", cli.Command(lambda cfg, args: seen.append(cfg), "train"))
    for argv in (["--model", "tiny"], ["--model", "tiny", "--algo", "ppo"],
                 ["--model", "tiny", "--algo", "ppo", "--batch-size", "24"], ["--model", "tiny-multihop"]):
        assert searchr1.main(argv) == 0
    grpo_cfg, ppo_cfg, ppo_24, multihop = seen
    assert multihop == replace(grpo_cfg, model="tiny-multihop")
    assert grpo_cfg.batch_size * grpo_cfg.samples_per_question == ppo_cfg.batch_size * ppo_cfg.samples_per_question
    assert grpo_cfg.batch_size * grpo_cfg.samples_per_question == 80
    assert ppo_cfg.samples_per_question == 1 and ppo_cfg.lr == grpo_cfg.lr and ppo_cfg.steps == grpo_cfg.steps
    assert ppo_24.batch_size == 24


def test_model_tiny_trains_on_the_cpu_in_float32_even_where_a_gpu_is_visible(monkeypatch):
    """README's tiny results were made on the CPU in float32: `--model tiny` gives them on a GPU machine
    too, where --device auto would take the GPU and bfloat16; --device cuda still asks for the GPU."""
    seen = []
    monkeypatch.setitem(searchr1.COMMANDS, "train", cli.Command(lambda cfg, args: seen.append(cfg), "train"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for argv in (["--model", "tiny"], ["--model", "tiny-multihop"], ["--model", "tiny", "--device", "cuda"]):
        assert searchr1.main(argv) == 0
    tiny_cfg, multihop_cfg, asked = seen
    for cfg in (tiny_cfg, multihop_cfg):
        device = policy.pick_device(cfg)
        assert device.type == "cpu" and policy.pick_dtype(cfg, device)[0] == torch.float32
    assert policy.pick_device(asked).type == "cuda"
    assert policy.pick_device(searchr1.Config(model="qwen2.5-3b")).type == "cuda"  # a real model takes it


def test_tiny_prepare_reuses_the_warm_up_of_the_same_task_and_remakes_it_for_another(tmp_path, monkeypatch):
    """A rerun or --resume of `--model tiny` must find the base its LoRA was trained on, not a new one."""
    task = tiny.TinyTask(entities=20, held_out=5, warmup_steps=3, short_steps=1, warmup_batch=4, hidden=32)
    paths = tiny.prepare(tmp_path, task, topk=1)
    weights = (tmp_path / "warmup" / "model.safetensors").read_bytes()
    real_warm_up, warm_ups = tiny.warm_up, []
    monkeypatch.setattr(tiny, "warm_up", lambda *args: warm_ups.append(args) or real_warm_up(*args))
    assert tiny.prepare(tmp_path, task, topk=1) == paths and warm_ups == []
    assert (tmp_path / "warmup" / "model.safetensors").read_bytes() == weights
    tiny.prepare(tmp_path, replace(task, seed=1), topk=1)
    assert len(warm_ups) == 1 and json.loads((tmp_path / "task.json").read_text())["seed"] == 1


LEARNING_TASK = tiny.TinyTask(entities=100, held_out=50, warmup_steps=450, short_steps=200)


@pytest.fixture(scope="module")
def warmed_up_task(tmp_path_factory):
    """The learning test's task, data to warm-up model, made once: each run copies it and
    run_tiny finds it finished (task.json), so GRPO and PPO start from the same model."""
    folder = tmp_path_factory.mktemp("learning") / "task"
    tiny.prepare(folder, LEARNING_TASK, searchr1.TINY["topk"])
    return folder


@pytest.fixture(scope="module")
def tiny_runs(warmed_up_task, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The learning test's runs, GRPO and PPO from the same warm-up: algo -> (run folder, run_tiny's result)."""
    runs = {}
    for algo, algo_defaults in (("grpo", {}), ("ppo", searchr1.TINY_PPO)):
        folder = tmp_path_factory.mktemp(algo)
        cfg = replace(searchr1.Config(), **{**searchr1.TINY, **algo_defaults, "algo": algo, "model": "tiny",
                                            "out_dir": str(folder), "steps": 8, "eval_every": 0, "eval_size": 50,
                                            "save_every": 8})
        shutil.copytree(warmed_up_task, folder / "task")
        runs[algo] = folder, searchr1.run_tiny(cfg, LEARNING_TASK)
    return runs


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_through_train_teaches_the_warmed_up_model_to_search(algo, tiny_runs):
    """The chapter's claim on a shorter schedule, for GRPO and for PPO: searchr1's own loop
    (rollout, EM reward, group or critic baseline, LoRA) turns a model that guesses into one that
    searches, and held-out EM follows."""
    _, result = tiny_runs[algo]
    before, after = result["before"], result["after"]
    assert before["searches"] < 0.2            # the warm-up guesses ...
    assert after["searches"] > 0.8             # ... RL makes it search ...
    assert after["em"] >= before["em"] + 0.3   # ... and answer held-out questions right


def test_the_healthy_tiny_runs_raise_no_health_warning(tiny_runs, multihop_run):
    """The learning runs, GRPO and PPO, single-hop and multi-hop, log the health signals every step and
    trip no check (health.CHECKS): the thresholds sit above what a run that learns does."""
    for run in [tiny_runs["grpo"][0], tiny_runs["ppo"][0], multihop_run[0]]:
        rows = runs.rows(run / "metrics.jsonl")
        assert rows and all("format_ok" in row and "policy_tokens" in row for row in rows)
        assert [row["step"] for row in rows if row.get("warnings")] == [], run


def test_a_run_driven_to_collapse_is_warned_of_before_its_held_out_em_falls(warmed_up_task, tmp_path):
    """An entropy bonus 40x the reference's (--entropy-coef 0.04) drives the tiny task to collapse: the
    sampled text turns to gibberish first, the greedy answers after. The health checks say so first
    (measured on this schedule: entropy and KL warn at step 8, held-out EM falls at step 10)."""
    folder = tmp_path / "collapse"
    shutil.copytree(warmed_up_task, folder / "task")
    cfg = replace(searchr1.Config(), **{**searchr1.TINY, "model": "tiny", "out_dir": str(folder), "steps": 12,
                                        "eval_every": 1, "eval_size": 50, "save_every": 12, "entropy_coef": 0.04})
    searchr1.run_tiny(cfg, LEARNING_TASK)
    rows = runs.rows(folder / "metrics.jsonl")
    em = {row["step"]: row["eval_em"] for row in rows}
    assert max(em.values()) >= 0.9  # it learned to search before it broke
    fell = min(step for step in em if max(em[s] for s in em if s <= step) - em[step] >= 0.2)
    warned = min(row["step"] for row in rows if row.get("warnings"))
    assert warned < fell


MULTIHOP_LEARNING_TASK = replace(tiny.TASKS["tiny-multihop"], entities=100, cities=50, held_out=50,
                                 warmup_steps=500, short_steps=200)


@pytest.fixture(scope="module")
def multihop_run(tmp_path_factory) -> tuple[Path, dict]:
    """The multi-hop task on a shorter schedule, GRPO: (run folder, run_tiny's result)."""
    folder = tmp_path_factory.mktemp("multihop")
    cfg = replace(searchr1.Config(), **{**searchr1.TINY, "model": "tiny-multihop", "out_dir": str(folder),
                                        "steps": 6, "eval_every": 0, "save_every": 6})
    return folder, searchr1.run_tiny(cfg, MULTIHOP_LEARNING_TASK)


def test_rl_teaches_the_warmed_up_model_to_search_again_with_what_it_read(multihop_run):
    """The multi-hop claim on a shorter schedule: the warm-up searches once and guesses; GRPO makes
    it search a second time, for the city the first passage named, and held-out EM follows."""
    before, after = multihop_run[1]["before"], multihop_run[1]["after"]
    assert before["searches"] < 1.2 and before["em"] < 0.3   # one search, then a guess
    assert after["searches"] > 1.6                           # the second search ...
    assert after["em"] >= before["em"] + 0.4                 # ... answers held-out questions


def test_the_multihop_agent_asked_a_held_out_question_looks_up_the_city_then_its_fact(multihop_run, capsys):
    run, _ = multihop_run
    eval_data = Path(json.loads((run / "config.json").read_text())["eval_data"])
    q = json.loads(eval_data.read_text().splitlines()[0])  # a held-out question, with the lookups it needs
    (entity, _, city), (_, attribute, answer) = q["lookups"]
    assert searchr1.main(["ask", "--model", "tiny-multihop", "--adapter", str(run), q["question"]]) == 0
    shown = capsys.readouterr().out
    assert shown.index(f"<search> {entity} city </search>") < shown.index(f"<search> {city} {attribute} </search>")
    assert f"answer: {answer}" in shown


def held_out_fact(run: Path) -> tuple[str, str]:
    """A held-out question of the tiny run and its answer."""
    config = json.loads((run / "config.json").read_text())
    q = load_qa(config["eval_data"])[0]
    return q["question"], q["golden_answers"][0]


def test_the_tiny_agent_just_trained_can_be_asked_and_evaluated(tiny_runs, capsys, tmp_path):
    run, _ = tiny_runs["grpo"]
    question, answer = held_out_fact(run)
    assert searchr1.main(["ask", "--model", "tiny", "--adapter", str(run), question]) == 0
    shown = capsys.readouterr().out
    assert "<search>" in shown and "[found: " in shown and f"answer: {answer}" in shown
    qa = write_jsonl(tmp_path / "held_out.jsonl", load_qa(json.loads((run / "config.json").read_text())
                                                                   ["eval_data"])[:20])
    assert searchr1.main(["eval", "--model", "tiny", "--adapter", str(run / "checkpoints" / "step-000008"),
                          "--datasets", str(qa), "--methods", "search-r1", "--out-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "search-r1" / "held_out.json").read_text())["em"] >= 0.8
    assert searchr1.main(["ask", "--model", "tiny", question]) == 2  # tiny without its run: one line


def test_export_writes_a_plain_model_whose_greedy_rollouts_equal_the_adapters(tiny_runs, tmp_path):
    from transformers import AutoModelForCausalLM
    run, _ = tiny_runs["grpo"]
    out = tmp_path / "merged"
    assert searchr1.main(["export", "--model", "tiny", "--adapter", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers model: no peft, no adapter
    assert merged.dtype == torch.bfloat16 and not any("lora" in name for name, _ in merged.named_parameters())
    cfg = agent.tiny_agent(replace(searchr1.Config(), **searchr1.TINY, model="tiny"), str(run))
    tokenizer, adapted = agent.load_agent(cfg, str(run), torch.device("cpu"))
    questions = load_qa(json.loads((run / "config.json").read_text())["eval_data"])[:16]
    search = agent.make_search(cfg)
    greedy = cfg.rollout_config(greedy=True)
    prompts = [build_prompt(q["question"], tokenizer, chat=False) for q in questions]
    by_adapter = [t.response_ids for t in rollout(adapted, tokenizer, prompts, search, greedy)]
    by_merged = [t.response_ids for t in rollout(merged.float(), tokenizer, prompts, search, greedy)]
    assert by_merged == by_adapter
    assert searchr1.main(["export", "--model", "tiny", "--adapter", str(run), "--out", str(out)]) == 2  # not empty
