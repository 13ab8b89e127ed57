"""Tests of retriever.py: corpus reading, the index cache, search, the observation format, and
BM25 parity with rank-bm25 and with the Lucene formula written out in numpy."""
import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tantivy
from rank_bm25 import BM25Okapi

from retriever import (FINGERPRINT_FILE, BM25Index, CorpusError, default_index_dir,
                       format_passages, read_corpus, split_contents, tokenize)

DATA = Path(__file__).parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (real wiki-18 and NQ files) is absent")

ROWS = [  # Search-R1's format: the title line keeps its quotes, as in wiki-18
    {"id": "0", "contents": '"Apple"\nThe apple is a fruit of the apple tree.'},
    {"id": "1", "contents": '"Banana"\nA banana is an elongated, edible fruit.\nIt grows in clusters.'},
    {"id": "2", "contents": '"Cherry"\nThe cherry is a fleshy drupe; cherries are red.'},
    {"id": "3", "contents": '"Paris"\nParis is the capital of France.'},
    {"id": "4", "contents": '"Apple Inc."\nApple designs phones in Cupertino.'},
]


def write_jsonl(path: Path, rows: list, compress: bool = False) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


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
    if not DATA.is_dir():
        pytest.skip(f"{DATA} (real wiki-18 and NQ files) is absent")
    return BM25Index.open(DATA / "wiki18-sample-1000.jsonl", tmp_path_factory.mktemp("wiki"))


# ---- reading a corpus ----

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


# ---- the tokenizer and the index ----

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


# ---- search ----

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


@needs_data
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


# ---- BM25 parity ----

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


@needs_data
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
