"""Tests of corpus.py: a folder of documents becomes a Search-R1 corpus retriever.py can search.

Each builds its documents in a temporary folder; seeded, offline, about a second in all. The PDF
test runs when pypdf is installed (its PDF is written by hand, below); the others run without it.
"""
import gzip
import json
import random
import sys
from pathlib import Path

import pytest

import corpus
from corpus import build_corpus, read_document, split_passages
from retriever import BM25Index, CorpusError, read_corpus, split_contents

VOCABULARY = "river stone cloud lamp bridge forest meadow harbour lantern valley".split()
PHRASE = "obsidian lighthouse marmalade"  # in one document only, for the search test


def prose(rng: random.Random, paragraphs: int) -> str:
    """Paragraphs (blank-line separated) of sentences of 3 to 30 words."""
    def sentence():
        words = [rng.choice(VOCABULARY) for _ in range(rng.randint(3, 30))]
        return " ".join(words).capitalize() + rng.choice([".", "!", "?", '."'])
    return "\n\n".join("\n".join(sentence() for _ in range(rng.randint(1, 8)))
                       for _ in range(paragraphs))


def make_docs(root: Path) -> Path:
    """A folder of every kind of file build_corpus meets; returns it."""
    docs = root / "docs"
    (docs / "sub" / "deep").mkdir(parents=True)
    (docs / "old").mkdir()
    notes = prose(random.Random(0), paragraphs=12)
    (docs / "notes.txt").write_text(notes)
    (docs / "old" / "notes.txt").write_text(notes)  # an exact copy: all its passages duplicates
    (docs / "guide.md").write_text("# Trail *Guide*\n\nRead [the map](http://example.org/m) and "
                                   "**pack** `water`.\n\n## Gear\n\n- boots\n- a coat\n")
    (docs / "page.html").write_text(
        "<html><head><title>Harbour &amp; Log</title><style>p { color: red }</style></head>"
        "<body><h1>Arrivals</h1><p>Three boats came in.</p><script>var hidden = 1;</script>"
        "<p>The tide was <b>high</b>.</p></body></html>")
    (docs / "sub" / "deep" / "field.md").write_text(f"Notes from the field: the {PHRASE} "
                                                    "was found under the pier.\n")
    (docs / "broken.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (docs / "empty.txt").write_text("")
    (docs / "slides.pptx").write_bytes(b"PK\x03\x04")
    (docs / ".secret.txt").write_text("hidden from the corpus")
    return docs


def rows_of(path: Path) -> list[dict]:
    return list(read_corpus(path))


# Passages

def test_every_word_of_the_source_is_in_the_passages_in_order_and_none_is_split():
    rng = random.Random(1)
    for words in (10, 40, 100):
        text = prose(rng, paragraphs=20)
        passages = split_passages(text, words)
        assert " ".join(passages).split() == text.split()


def test_passages_keep_half_the_budget_to_the_budget_and_a_merged_tail_stays_under_a_quarter():
    rng = random.Random(2)
    for words in (10, 40, 100):
        for _ in range(20):
            lengths = [len(p.split()) for p in split_passages(prose(rng, paragraphs=10), words)]
            assert all((words + 1) // 2 <= n <= words for n in lengths[:-1])
            assert words // 4 <= lengths[-1] <= words + words // 4 - 1


def test_a_passage_ends_at_a_paragraph_end_rather_than_a_later_sentence_end():
    paragraph = " ".join(["word"] * 59) + " end."     # 60 words
    following = (" ".join(["more"] * 29) + " stop. ") * 4  # sentences of 30 words
    passages = split_passages(paragraph + "\n\n" + following, words=100)
    assert passages[0] == paragraph


def test_a_paragraph_longer_than_the_budget_is_cut_at_its_last_sentence_end_that_fits():
    sentence = " ".join(["word"] * 29) + " stop."  # 30 words
    passages = split_passages(" ".join([sentence] * 5), words=100)  # 150 words, one paragraph
    assert [len(p.split()) for p in passages] == [90, 60]
    assert all(p.endswith("stop.") for p in passages)


def test_a_sentence_longer_than_the_budget_is_cut_between_words():
    passages = split_passages(" ".join(f"w{i}" for i in range(250)), words=100)
    assert [len(p.split()) for p in passages] == [100, 100, 50]
    assert passages[1].split()[0] == "w100"


def test_a_tail_under_a_quarter_of_the_budget_joins_the_passage_before_it():
    assert [len(p.split()) for p in split_passages("w " * 110, words=100)] == [110]
    assert [len(p.split()) for p in split_passages("w " * 130, words=100)] == [100, 30]


# Documents

DOCUMENTS = {  # file name -> (its content, the title read, the words of each paragraph read)
    "trail.md": ("Intro line.\n\n### Aside\n\n## Gear *list* ##\n\n- boots\n> quoted\n\n"
                 "Read [the map](http://example.org/m) and **pack** `water`.\n\n"
                 "```bash\n# not a heading\nls\n```\n",
                 "Gear list",  # the first heading of the top level (##), not one in code
                 [["Intro", "line."], ["Aside", "Gear", "list", "boots", "quoted"],  # a heading joins its text
                  ["Read", "the", "map", "and", "pack", "water."], ["#", "not", "a", "heading", "ls"]]),
    "page.html": ("<head><title>Harbour &amp; Log</title><style>p {}</style></head><body>"
                  "<h1>Arrivals</h1><p>Three boats.</p><script>var x;</script><p>High<br>tide.</p></body>",
                  "Harbour & Log", [["Arrivals"], ["Three", "boats."], ["High"], ["tide."]]),
    "notes.md": ("No heading here.\n", "notes", [["No", "heading", "here."]]),  # the file name is its title
    "bare.html": ("<body><h1>Only a <i>heading</i></h1><p>Text.</p></body>", "Only a heading",
                  [["Only", "a", "heading"], ["Text."]]),
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_markdown_and_html_read_as_their_text_in_paragraphs_under_their_title(name, tmp_path):
    """Markdown loses its markers and keeps code as text; HTML loses script and style and breaks
    paragraphs at block elements; the title is the top heading or <title>, else the <h1> or the name."""
    content, title, paragraphs = DOCUMENTS[name]
    (tmp_path / name).write_text(content)
    read_title, text = read_document(tmp_path / name)
    assert read_title == title
    assert [p.split() for p in text.split("\n\n") if p.strip()] == paragraphs


def minimal_pdf(lines: list[str], title: str) -> bytes:
    """A one-page PDF written by hand: Helvetica text, /Title in its Info dictionary."""
    text = b" ".join(b"(%s) Tj 0 -14 Td" % line.encode("latin-1") for line in lines)
    stream = b"BT /F1 12 Tf 72 720 Td " + text + b" ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Title (%s) >>" % title.encode("latin-1")]
    pdf, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(pdf))  # the cross-reference table holds each object's byte offset
        pdf += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    pdf += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    pdf += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(pdf)


def test_a_pdf_gives_its_text_and_its_metadata_title(tmp_path):
    pytest.importorskip("pypdf")
    file = tmp_path / "report.pdf"
    file.write_bytes(minimal_pdf(["The zebra quartz harmonica sings.", "A second line."],
                                 title="Field Report"))
    assert read_document(file) == ("Field Report",
                                   "The zebra quartz harmonica sings.\nA second line.\n")
    summary = build_corpus([file], tmp_path / "out.jsonl")
    assert summary.files_read == 1 and summary.passages == 1


def test_a_pdf_is_skipped_with_the_install_hint_when_pypdf_is_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # `import pypdf` now raises ImportError
    (tmp_path / "report.pdf").write_bytes(minimal_pdf(["Some text."], title="Report"))
    (tmp_path / "notes.txt").write_text("Some notes.")
    summary = build_corpus([tmp_path], tmp_path / "out" / "corpus.jsonl")
    assert summary.skipped == {corpus.PYPDF_MISSING: [str(tmp_path / "report.pdf")]}
    assert corpus.PYPDF_MISSING == "pypdf is not installed: pip install pypdf"


# The corpus

def test_a_folder_becomes_rows_whose_titles_and_texts_round_trip_through_the_retriever(tmp_path):
    docs = make_docs(tmp_path)
    out = tmp_path / "corpus.jsonl"
    build_corpus([docs], out)
    rows = rows_of(out)
    titles = {row["id"]: split_contents(row["contents"])[0] for row in rows}
    assert titles["guide.md#0"] == '"Trail Guide"'
    assert titles["page.html#0"] == '"Harbour & Log"'
    assert titles["notes.txt#0"] == '"notes"'
    assert titles["sub/deep/field.md#0"] == '"field"'
    notes = split_passages((docs / "notes.txt").read_text())
    texts = {row["id"]: split_contents(row["contents"])[1] for row in rows}
    assert [texts[f"notes.txt#{i}"] for i in range(len(notes))] == notes
    assert texts["page.html#0"] == "Arrivals Three boats came in. The tide was high."
    assert len(texts) == len(rows)  # ids are unique


def test_two_runs_write_byte_identical_output_in_whatever_order_the_file_system_lists_files(tmp_path,
                                                                                             monkeypatch):
    docs = make_docs(tmp_path)
    build_corpus([docs], tmp_path / "first.jsonl")
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda folder: reversed(list(listing(folder))))  # another disk's order
    build_corpus([docs], tmp_path / "second.jsonl")
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()


def test_the_summary_counts_files_read_skipped_by_reason_and_duplicates_exactly(tmp_path):
    docs = make_docs(tmp_path)
    summary = build_corpus([docs], tmp_path / "corpus.jsonl")
    notes = split_passages((docs / "notes.txt").read_text())
    assert summary.files_read == 5  # notes, its copy, guide, page, field
    assert summary.skipped == {"hidden": [str(docs / ".secret.txt")],
                               "not UTF-8": [str(docs / "broken.txt")],
                               "empty": [str(docs / "empty.txt")],
                               "unsupported type .pptx": [str(docs / "slides.pptx")]}
    assert summary.duplicates == len(notes)  # every passage of old/notes.txt
    assert summary.passages == len(notes) + 3 == len(rows_of(tmp_path / "corpus.jsonl"))
    assert summary.shortest == (9, str(docs / "page.html"))  # "Arrivals Three boats came in. ..."
    assert summary.longest == (len((docs / "notes.txt").read_text().split()),
                               str(docs / "notes.txt"))
    rendered = summary.render()
    assert f"wrote {summary.passages} passages" in rendered and "4 skipped" in rendered
    assert f"not UTF-8 [{docs / 'broken.txt'}]" in rendered


def test_a_file_with_invalid_utf8_is_reported_by_path_and_never_dropped_silently(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.".encode("latin-1"))
    (tmp_path / "fine.txt").write_text("Caf\u00e9 cr\u00e8me.")
    summary = build_corpus([tmp_path], tmp_path / "out" / "corpus.jsonl")
    assert summary.skipped == {"not UTF-8": [str(tmp_path / "latin1.txt")]}
    assert "latin1.txt" in summary.render()


def test_an_unreadable_file_is_reported_by_path_and_reason(tmp_path, monkeypatch):
    (tmp_path / "locked.txt").write_text("Secret.")
    (tmp_path / "open.txt").write_text("Public.")
    read_bytes = Path.read_bytes

    def denied_for_locked(path):  # as chmod 000 would, even when the tests run as root
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)
    monkeypatch.setattr(Path, "read_bytes", denied_for_locked)
    summary = build_corpus([tmp_path], tmp_path / "out" / "corpus.jsonl")
    assert summary.skipped == {"unreadable (Permission denied)": [str(tmp_path / "locked.txt")]}


def test_strict_raises_naming_every_skipped_path_and_reason_and_writes_nothing(tmp_path):
    docs = make_docs(tmp_path)
    out = tmp_path / "corpus.jsonl"
    with pytest.raises(CorpusError) as error:
        build_corpus([docs], out, strict=True)
    for reason, name in [("hidden", ".secret.txt"), ("not UTF-8", "broken.txt"),
                         ("empty", "empty.txt"), ("unsupported type .pptx", "slides.pptx")]:
        assert f"{reason} [{docs / name}]" in str(error.value)
    assert not out.exists() and not (tmp_path / "corpus.jsonl.tmp").exists()


def test_a_search_r1_jsonl_passed_in_is_copied_as_it_is(tmp_path):
    wiki = [{"id": "0", "contents": '"Evan Morris"\nEvan L. Morris was a lobbyist.'},
            {"id": "1", "contents": '"Horatio Hale"\nHale gathered an Algonkin vocabulary.'}]
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps(row) + "\n" for row in wiki))
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as more:
        more.write(json.dumps({"id": 7, "title": "Kew", "text": "Gardens."}) + "\n")
    (tmp_path / "mine.txt").write_text("My own note.")
    out = tmp_path / "out" / "corpus.jsonl"
    summary = build_corpus([tmp_path / "wiki.jsonl", tmp_path / "more.jsonl.gz",
                            tmp_path / "mine.txt"], out)
    assert rows_of(out) == wiki + [{"id": "7", "contents": '"Kew"\nGardens.'},
                                   {"id": "mine.txt#0", "contents": '"mine"\nMy own note.'}]
    assert (summary.files_read, summary.rows_copied, summary.passages) == (3, 3, 4)


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0", "contents": "\\"T\\"\\nfine"}\n{"id": "1"}\n')
    with pytest.raises(CorpusError, match=f"{bad}:2: missing field 'contents'"):
        build_corpus([bad], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_bm25_over_the_corpus_finds_the_passage_holding_a_distinctive_phrase(tmp_path):
    out = tmp_path / "corpus.jsonl"
    build_corpus([make_docs(tmp_path)], out)
    index = BM25Index.open(out, index_dir=tmp_path / "index")
    [[hit]] = index.search([f"where was the {PHRASE}"], k=1)
    assert hit["id"] == "sub/deep/field.md#0" and PHRASE in hit["text"]


def test_the_output_may_not_overwrite_an_input(tmp_path):
    docs = make_docs(tmp_path)
    build_corpus([docs], docs / "corpus.jsonl")  # the first run: not an input yet
    before = (docs / "corpus.jsonl").read_bytes()
    with pytest.raises(CorpusError, match="refusing to overwrite"):
        build_corpus([docs], docs / "corpus.jsonl")  # now it is one
    assert (docs / "corpus.jsonl").read_bytes() == before


def test_no_passages_at_all_is_an_error_that_names_what_was_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(CorpusError, match=r"no passages in .*\n  empty \[.*empty.txt\]"):
        build_corpus([tmp_path], tmp_path / "out" / "corpus.jsonl")


def test_two_documents_that_would_share_ids_are_an_error(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text(f"Notes of {folder}.")
    with pytest.raises(CorpusError, match="would both have the ids notes.txt#N"):
        build_corpus([tmp_path / "a", tmp_path / "b"], tmp_path / "out.jsonl")


def test_the_corpus_command_writes_the_corpus_prints_its_summary_and_stops_on_a_bad_flag_or_a_strict_skip(
        tmp_path, capsys):
    import searchr1
    docs = make_docs(tmp_path)
    out = tmp_path / "my_docs.jsonl"
    assert searchr1.main(["corpus", str(docs), "--out", str(out), "--words", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("wrote ") and str(out) in printed and "skipped:" in printed
    assert sum(1 for _ in read_corpus(out)) == int(printed.split()[1].replace(",", ""))
    assert searchr1.main(["corpus", str(docs), "--out", str(tmp_path / "x.jsonl"), "--words", "0"]) == 2
    assert "--words 0: must be at least 1" in capsys.readouterr().err
    assert searchr1.main(["corpus", str(docs), "--out", str(tmp_path / "y.jsonl"), "--strict"]) == 2
    error = capsys.readouterr().err  # after the progress bar's lines
    assert "error: strict: these files were skipped" in error and "broken.txt" in error
    assert not (tmp_path / "y.jsonl").exists()


def test_the_notes_readme_asks_about_become_passages_whose_titles_and_facts_bm25_finds(tmp_path):
    """data/notes/, the folder of README's "your own search agent": each note a passage titled by its
    document, and the query the tiny agent writes for "What is the food of Terekes?" finds its note."""
    notes = Path(__file__).resolve().parent / "data" / "notes"
    out = tmp_path / "notes.jsonl"
    summary = build_corpus([notes], out)
    assert (summary.files_read, summary.passages, summary.skipped) == (3, 3, {})
    titles = {row["id"]: split_contents(row["contents"])[0] for row in rows_of(out)}
    assert titles == {"harbour.html#0": '"Harbour log"', "sevaves.txt#0": '"sevaves"', "terekes.md#0": '"Terekes"'}
    (hit,) = BM25Index.open(out, index_dir=tmp_path / "index").search(["Terekes food"], k=1)[0]
    assert hit["id"] == "terekes.md#0" and "The food of Terekes is soup." in hit["text"]
