"""The search engine: BM25 over a Search-R1 corpus, served by tantivy.

When the policy writes `<search> query </search>`, the rollout calls `BM25Index.search` and puts
the top-3 passages, formatted by `format_passages`, back into the context.

BM25, in Lucene's form, which tantivy implements. For a query with terms t and a passage d:

    score(q, d) = sum_t idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

tf(t,d) = times t occurs in d, |d| = tokens in d, avgdl = mean |d|, N = passages, n(t) = passages
containing t. k1 = 1.2 sets how fast repeating a term stops paying; b = 0.75 how much a long
passage is penalized. A term repeated in the query counts once per repeat.

Why tantivy (a Rust engine with Python bindings): `python bench.py retriever` on 2 cores (the
table in docs/retrieval.md), 256 queries a batch, top-3 — at 100k passages rank-bm25 answers
5.1 queries/s, tantivy 8,289; at 1M passages tantivy builds in 41 s and answers 1,580 queries/s
at a peak RSS of 0.71 GB (rank-bm25: 0.5 queries/s, 6.2 GB). rank-bm25 scores every passage
that holds a query term; tantivy skips blocks of passages that cannot reach the top-k (block-max
WAND) and memory-maps its index, so a GRPO step's few hundred queries per turn stay cheap on
wiki-18's 21M passages.

Tokens: split on every non-alphanumeric character, lowercase, drop English stopwords (tantivy's
33-word list: "a", "the", "of", ...). `ANALYZER` does this for passages (registered on the index)
and for queries (`tokenize`), so both sides see exactly the same tokens:
    'The U.S. Army's F-16' -> ['u', 's', 'army', 's', 'f', '16']
A query is the OR of its tokens' term queries, never tantivy's query language: an LLM's query holds
quotes, colons and AND/OR that a parser would interpret or reject.

On disk (default folder `${SEARCHR1_CACHE:-~/.cache/searchr1}/indexes/<corpus name>-<path hash>/`):
    meta.json, *.idx, *.term, *.store, ...   tantivy's segments: id + contents stored, term
                                             frequencies (no positions); data only, nothing runs
    searchr1-index.json                      the corpus fingerprint (sha256, size, passages) and
                                             the tokenizer; a mismatch rebuilds the index
A build writes into `<folder>.partial`, writes the JSON last and renames the folder into place, so
a killed build never leaves an index that loads.

Where this departs from Search-R1:
- BM25 instead of the paper's main retriever, E5 (dense): no encoder model and no GPU index of 21M
  vectors; BM25 over wiki-18 is the sparse retriever Search-R1 itself supports.
- k1 = 1.2, b = 0.75 (Lucene's defaults, fixed inside tantivy) instead of pyserini's 0.9 / 0.4 used
  by Search-R1's BM25 server; no Porter stemming (pyserini stems by default).
- Passage lengths |d| are kept in one byte, as Lucene does: exact up to 40 tokens; above, |d| - 24
  keeps its 4 leading bits (100 -> 96, 1000 -> 984). Scores differ from BM25 on exact lengths by up
  to 4.3% on the wiki-18 sample; rankings rarely change.
"""
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import tantivy
from tqdm import tqdm

FORMAT_VERSION = 1  # bump when the on-disk layout changes: every cached index then rebuilds
TOKENIZER_NAME = "searchr1"
TOKENIZER = "tantivy simple tokenizer + lowercase + stopword(english)"
FINGERPRINT_FILE = "searchr1-index.json"
WRITER_HEAP_BYTES = 1_000_000_000  # shared by the 2 indexing threads; more heap = fewer segments

ANALYZER = (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.lowercase())
            .filter(tantivy.Filter.stopword("english"))
            .build())


def tokenize(text: str) -> list[str]:
    """The tokens BM25 sees, for a query or a passage."""
    return ANALYZER.analyze(text)


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file, the line and the field."""


def _parse_row(line: bytes, where: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as error:  # invalid JSON or invalid UTF-8
        raise CorpusError(f"{where}: invalid JSON ({error})") from None
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise CorpusError(f"{where}: missing field 'id'")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise CorpusError(f"{where}: field 'id' must be a string or an integer")
    fields = ["contents"] if "contents" in row else ["title", "text"]
    for field in fields:
        if field not in row:
            raise CorpusError(f"{where}: missing field 'contents' (or 'title' and 'text')")
        if not isinstance(row[field], str):
            raise CorpusError(f"{where}: field '{field}' must be a string")
    contents = row["contents"] if "contents" in row else join_contents(row["title"], row["text"])
    return {"id": str(row["id"]), "contents": contents}


def read_corpus(path, progress: bool = False) -> Iterator[dict]:
    """Stream {"id", "contents"} per passage of a JSONL corpus, plain or gzip.

    Rows are {"id", "contents": '"Title"\\ntext'} (Search-R1, wiki-18) or {"id", "title", "text"},
    which becomes the same contents. Blank lines are skipped; a bad row raises CorpusError.
    """
    path = Path(path)
    passages = 0
    with open(path, "rb") as raw, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                       desc=f"indexing {path.name}", disable=not progress) as bar:
        is_gzip = raw.peek(2)[:2] == b"\x1f\x8b"  # gzip's magic bytes, whatever the file name
        lines = gzip.GzipFile(fileobj=raw) if is_gzip else raw
        for line_number, line in enumerate(lines, start=1):
            if line_number % 10_000 == 0:
                bar.update(raw.tell() - bar.n)  # compressed bytes read so far
            if line.strip():
                yield _parse_row(line, f"{path}:{line_number}")
                passages += 1
        bar.update(raw.tell() - bar.n)
    if passages == 0:
        raise CorpusError(f"{path}: the corpus has no passages")


def join_contents(title: str, text: str) -> str:
    """A passage's `contents` as wiki-18 writes it: the title in quotes on the first line, then the text."""
    return f'"{title}"\n{text}'


def split_contents(contents: str) -> tuple[str, str]:
    """Title = the first line as is (wiki-18 keeps its quotes: '"Evan Morris"'), text = the rest."""
    title, _, text = contents.partition("\n")
    return title, text


def make_hit(passage_id: str, contents: str, score: float) -> dict:
    """One search hit, as BM25Index.search and search_api.RemoteIndex.search return it."""
    title, text = split_contents(contents)
    return {"id": passage_id, "contents": contents, "title": title, "text": text, "score": score}


def format_passages(hits: list[dict]) -> str:
    """The passages as an observation shows them (without the <information> tags): one
    `Doc i(Title: title) text` line per passage, i from 1."""
    return "".join(f"Doc {i}(Title: {hit['title']}) {hit['text']}\n"
                   for i, hit in enumerate(hits, start=1)).strip()


def default_index_dir(corpus_path) -> Path:
    """`${SEARCHR1_CACHE:-~/.cache/searchr1}/indexes/<corpus name>-<hash of its absolute path>`."""
    corpus_path = Path(corpus_path).resolve()
    cache = Path(os.environ.get("SEARCHR1_CACHE", "~/.cache/searchr1")).expanduser()
    path_hash = hashlib.sha256(str(corpus_path).encode()).hexdigest()[:8]
    return cache / "indexes" / f"{corpus_path.name}-{path_hash}"


def _tantivy_index(folder: Path, create: bool) -> tantivy.Index:
    if create:
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
        builder.add_text_field("contents", stored=True, tokenizer_name=TOKENIZER_NAME,
                               index_option="freq")  # BM25 needs term frequencies, not positions
        index = tantivy.Index(builder.build(), path=str(folder))
    else:
        index = tantivy.Index.open(str(folder))
    index.register_tokenizer(TOKENIZER_NAME, ANALYZER)
    return index


def _is_current(index_dir: Path, fingerprint: dict) -> bool:
    """True when index_dir holds a complete index built from this corpus with this tokenizer."""
    try:
        saved = json.loads((index_dir / FINGERPRINT_FILE).read_text())
        return ({key: saved.get(key) for key in fingerprint} == fingerprint
                and tantivy.Index.is_compatible(str(index_dir)))
    except (OSError, ValueError):  # no JSON (never finished), unreadable JSON or index
        return False


class BM25Index:
    """A BM25 index over one corpus; `BM25Index.open(corpus)` loads it from disk or builds it."""

    def __init__(self, index: tantivy.Index, index_dir: Path):
        self.index_dir = index_dir
        self._schema = index.schema
        self._searcher = index.searcher()  # one consistent view; the index never changes

    @classmethod
    def open(cls, corpus_path, index_dir=None, rebuild: bool = False) -> "BM25Index":
        corpus_path = Path(corpus_path)
        index_dir = Path(index_dir) if index_dir is not None else default_index_dir(corpus_path)
        with open(corpus_path, "rb") as corpus:
            sha256 = hashlib.file_digest(corpus, "sha256").hexdigest()  # ~1.6 GB/s here
        fingerprint = {"format": FORMAT_VERSION, "tokenizer": TOKENIZER, "corpus_sha256": sha256,
                       "corpus_bytes": corpus_path.stat().st_size}
        if rebuild or not _is_current(index_dir, fingerprint):
            cls._build(corpus_path, index_dir, fingerprint)
        return cls(_tantivy_index(index_dir, create=False), index_dir)

    @staticmethod
    def _build(corpus_path: Path, index_dir: Path, fingerprint: dict) -> None:
        if (index_dir.exists() and any(index_dir.iterdir())
                and not (index_dir / "meta.json").exists()):
            raise FileExistsError(f"{index_dir} is not empty and holds no tantivy index; "
                                  "refusing to replace it")
        partial = index_dir.with_name(index_dir.name + ".partial")  # one builder at a time
        shutil.rmtree(partial, ignore_errors=True)  # left by a build that was killed
        partial.mkdir(parents=True)
        writer = _tantivy_index(partial, create=True).writer(WRITER_HEAP_BYTES, num_threads=2)
        passages = 0
        for passage in read_corpus(corpus_path, progress=True):
            writer.add_document(tantivy.Document(id=passage["id"], contents=passage["contents"]))
            passages += 1
        writer.commit()
        writer.wait_merging_threads()
        # The fingerprint goes in last: a folder without it is an unfinished build.
        fingerprint = {**fingerprint, "passages": passages}
        (partial / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1) + "\n")
        shutil.rmtree(index_dir, ignore_errors=True)
        os.replace(partial, index_dir)

    def __len__(self) -> int:
        return self._searcher.num_docs

    def search(self, queries: list[str], k: int = 3) -> list[list[dict]]:
        """Per query, its top-k passages best first: {"id", "contents", "title", "text", "score"}.

        A query with no token left after tokenizing (empty, stopwords only) gets []. Fewer than k
        hits come back when fewer passages hold a query token.
        """
        if isinstance(queries, str):
            raise TypeError("search takes a list of queries, not one string")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))  # tantivy's top-k collector reserves room for k hits
        return [self._search_one(query, k) for query in queries]

    def _search_one(self, query: str, k: int) -> list[dict]:
        terms = tokenize(query)
        if not terms:
            return []
        # OR of the terms: a passage scores the sum of its terms' BM25 contributions
        should = [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "contents", term))
                  for term in terms]
        hits = []
        for score, address in self._searcher.search(tantivy.Query.boolean_query(should), limit=k,
                                                    count=False).hits:
            passage = self._searcher.doc(address)
            hits.append(make_hit(passage.get_first("id"), passage.get_first("contents"), score))
        return hits
