"""Your own documents as a Search-R1 corpus: `python searchr1.py corpus PATH ... --out my.jsonl`.

Search-R1 searches wiki-18: 21M passages of a 2018 Wikipedia, one JSONL row each, {"id",
"contents": '"Title"\ntext'}. This chapter makes the same file from a person's notes, web pages
and papers, for `--corpus my.jsonl`; retriever.py reads it (`read_corpus`, `BM25Index.open`).

    build_corpus    files and folders -> one JSONL corpus, written atomically; returns a Summary
    read_document   one file -> (title, text): .txt, .md/.markdown, .html/.htm, .pdf (with pypdf)
    split_passages  a document's text -> passages of about `words` words

Passages. wiki-18's are 100 words (DPR's split): three fit in the context beside the question and
the reasoning, and one holds a fact with its context. Here a passage keeps ceil(words/2) to
`words` words and ends at the best break in that window: a paragraph end, else a sentence end (a
word ending in . ! ? or …), else the last word that fits; never inside a word. A tail under
words/4 words joins the passage before it (up to 1.25 x words) rather than stand alone.

Titles. A passage carries its document's title: Markdown's top heading, HTML's <title> (else its
first <h1>), a PDF's metadata title, else the file name without its extension. The row holds it
quoted on the first line, as wiki-18 does; the agent reads it as `Doc 1(Title: "My notes") ...`.

Ids. "<path inside the folder argument>#<passage number from 0>" (for a file argument, its name):
the same files give the same rows, byte for byte, so an index rebuilt from them is the same.

Every file is read or skipped with a reason (hidden, unsupported type, pypdf is not installed,
unreadable, not UTF-8, empty) that the Summary lists; `strict=True` makes any skip a CorpusError.
A Search-R1 JSONL input is all or nothing: retriever's reader checks it (a bad row is named by
file:line and field) and its rows are copied as they are.

Where this departs from wiki-18:
- Passage lengths vary (words/2 to 1.25 x words) where wiki-18 cuts at every 100th word: a passage
  that ends at a sentence reads whole, and BM25's length normalisation (b = 0.75) evens it out.
- Exact duplicate passages (same text once whitespace is collapsed) are dropped, as a person's
  folder holds copies; rows of a JSONL input are never dropped, nor their ids checked.
- Markdown loses only its heading, quote and list markers, *, `, ~~ and link syntax; text files
  must be UTF-8 (no guessing at encodings).
"""
import argparse
import html.parser
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from retriever import CorpusError, join_contents, read_corpus

CORPUS_KINDS = (".jsonl", ".jsonl.gz")  # Search-R1 corpora, copied row by row
PYPDF_MISSING = "pypdf is not installed: pip install pypdf"
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")          # a blank line
SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")            # 'end.', 'end."', 'end?)'
PARAGRAPH, SENTENCE, WORD = 2, 1, 0                         # how good a cut after a word is


class Skipped(Exception):
    """A file that gives no text; the message is the reason the Summary shows."""


# Passages

def split_passages(text: str, words: int = 100) -> list[str]:
    """A document's text cut into passages of ceil(words/2) to `words` words (module docstring)."""
    if words < 1:
        raise ValueError(f"words must be at least 1, got {words}")
    tokens: list[str] = []  # the document's words, in order
    breaks = [WORD]         # breaks[i]: how good a cut before tokens[i] is; len(tokens) + 1
    for paragraph in PARAGRAPH_BREAK.split(text):
        for token in paragraph.split():
            tokens.append(token)
            breaks.append(SENTENCE if SENTENCE_END.search(token) else WORD)
        breaks[-1] = PARAGRAPH
    passages, start = [], 0
    while len(tokens) - start > words:
        ends = range(start + (words + 1) // 2, start + words + 1)  # where this passage may end
        end = max(ends, key=lambda end: (breaks[end], end))        # the best break, latest of ties
        passages.append(tokens[start:end])
        start = end
    tail = tokens[start:]
    if passages and len(tail) < words // 4:
        passages[-1] += tail  # a few words alone make a poor search hit
    elif tail:
        passages.append(tail)
    return [" ".join(passage) for passage in passages]


# Documents: (title, text) from each type of file; text keeps its paragraphs as blank lines

def _decoded(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark is not text
    except UnicodeDecodeError:
        raise Skipped("not UTF-8") from None


def _read_text(file: Path) -> tuple[str, str]:
    return "", _decoded(file)


MD_FENCE = re.compile(r"\s*(```|~~~)")                          # a code block starts or ends
MD_HEADING = re.compile(r"\s{0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$")  # '## Title ##' -> 2, 'Title'
MD_LINE_MARK = re.compile(r"^\s*(>\s?|[-+*]\s+|\d+[.)]\s+)")     # quote, bullet, numbered item
MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")                 # [text](url), ![alt](src)
MD_EMPHASIS = re.compile(r"\*+|`+|~~")


def _plain_markdown(line: str) -> str:
    return MD_EMPHASIS.sub("", MD_LINK.sub(r"\1", line))


def _read_markdown(file: Path) -> tuple[str, str]:
    """Text with its markup stripped, and the first heading of the top level (outside code)."""
    lines, headings, in_code, after_heading = [], [], False, False
    for line in _decoded(file).splitlines():
        if MD_FENCE.match(line):
            in_code = not in_code
            continue  # the fence is markup; the code inside is kept as text
        heading = None if in_code else MD_HEADING.match(line)
        if heading:
            line = _plain_markdown(heading[2])
            headings.append((len(heading[1]), line))
        elif not in_code:
            if after_heading and not line.strip():
                continue  # a heading stays in one paragraph with the text under it
            line = _plain_markdown(MD_LINE_MARK.sub("", line))
        lines.append(line)
        after_heading = bool(heading)
    title = min(headings, key=lambda heading: heading[0])[1] if headings else ""
    return title, "\n".join(lines)


class _HTMLText(html.parser.HTMLParser):
    """A page's text without script and style, a paragraph break at each block element; its
    <title> and its first <h1>."""
    BLOCKS = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt",
              "figcaption", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li",
              "main", "nav", "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul"}
    HIDDEN = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)  # &amp; -> &
        self.parts: list[str] = []  # text and paragraph breaks, in page order
        self.title, self.h1 = "", ""
        self.capturing = ""         # "title" or "h1" while inside the one being captured
        self.hidden = 0             # script/style elements open around the current text

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")
        if (tag == "title" and not self.title) or (tag == "h1" and not self.h1):
            self.capturing = tag

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self.hidden:
            self.hidden -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")
        if tag == self.capturing:
            self.capturing = ""

    def handle_data(self, data):
        if self.capturing == "title":
            self.title += data  # the title goes on the passage's first line, not into its text
        elif not self.hidden:
            if self.capturing == "h1":
                self.h1 += data  # the first <h1> stays in the text too
            self.parts.append(data)


def _read_html(file: Path) -> tuple[str, str]:
    page = _HTMLText()
    page.feed(_decoded(file))
    page.close()
    return page.title or page.h1, "".join(page.parts)


def _read_pdf(file: Path) -> tuple[str, str]:
    try:
        import pypdf  # optional (pure Python): without it PDFs are skipped, with the reason
    except ImportError:
        raise Skipped(PYPDF_MISSING) from None
    try:
        reader = pypdf.PdfReader(file)
        pages = [page.extract_text() for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except pypdf.errors.PyPdfError as error:  # damaged, truncated, encrypted
        raise Skipped(f"unreadable PDF ({error})") from None
    return str(title or ""), "\n\n".join(pages)  # a page ends a paragraph


READERS = {".txt": _read_text, ".md": _read_markdown, ".markdown": _read_markdown,
           ".html": _read_html, ".htm": _read_html, ".pdf": _read_pdf}


def read_document(file: Path) -> tuple[str, str]:
    """(title, text) of one document; raises Skipped with the reason when it gives no text."""
    file = Path(file)
    kind = file.suffix.lower()
    if kind not in READERS:
        raise Skipped(f"unsupported type {kind or '(no extension)'}")
    try:
        title, text = READERS[kind](file)
    except OSError as error:  # permission denied, a folder named like a file, ...
        raise Skipped(f"unreadable ({error.strerror or error})") from None
    if not text.split():
        raise Skipped("empty")
    return " ".join(title.split()) or file.stem, text


# The corpus

@dataclass
class Summary:
    """What build_corpus did, for the one summary it prints at the end."""
    out: str                      # the corpus written
    files_read: int = 0           # documents cut into passages + JSONL corpora copied
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths, in order
    passages: int = 0             # rows written, from all files
    rows_copied: int = 0          # of which rows copied from JSONL corpora
    duplicates: int = 0           # passages dropped: the same text as one already written
    shortest: tuple[int, str] | None = None  # (words, path) of the shortest document read
    longest: tuple[int, str] | None = None   # (words, path) of the longest

    def count_document(self, file: Path, words: int) -> None:
        """Count a document read, of `words` words."""
        self.files_read += 1
        if self.shortest is None or words < self.shortest[0]:
            self.shortest = (words, str(file))
        if self.longest is None or words > self.longest[0]:
            self.longest = (words, str(file))

    def skip(self, file: Path, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(str(file))

    def skipped_lines(self) -> list[str]:
        return [f"  {reason} [{', '.join(paths)}]" for reason, paths in self.skipped.items()]

    def render(self) -> str:
        skipped = sum(map(len, self.skipped.values()))
        lines = [f"wrote {self.passages:,} passages to {self.out}: {self.files_read:,} files "
                 f"read, {skipped:,} skipped, {self.duplicates:,} duplicate passages dropped"]
        if self.rows_copied:
            lines.append(f"of which {self.rows_copied:,} rows copied from JSONL corpora")
        if self.shortest and self.longest:
            lines.append(f"documents: shortest {self.shortest[0]:,} words ({self.shortest[1]}), "
                         f"longest {self.longest[0]:,} words ({self.longest[1]})")
        if skipped:
            lines += ["skipped:"] + self.skipped_lines()
        return "\n".join(lines)


def _walk(folder: Path) -> Iterator[Path]:
    """The files under folder, sorted; a hidden folder comes out whole, as one entry to skip."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            yield from _walk(entry)
        else:
            yield entry


def _sources(paths: list) -> list[tuple[Path, str]]:
    """(file, id prefix) for every file to read, in reading order, each file once."""
    sources, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        found = ([(file, file.relative_to(path).as_posix()) for file in _walk(path)]
                 if path.is_dir() else [(path, path.name)])
        for file, prefix in found:
            if file.resolve() not in seen:  # a file named twice (a folder and its file) reads once
                seen.add(file.resolve())
                sources.append((file, prefix))
    return sources


def _row(passage_id: str, title: str, text: str) -> str:
    """One JSONL line; retriever.split_contents gives back ('"title"', text)."""
    return json.dumps({"id": passage_id, "contents": join_contents(title, text)}, ensure_ascii=False)


def build_corpus(paths: list, out: Path, strict: bool = False, words: int = 100) -> Summary:
    """Read files and folders (recursively, sorted) and write their passages to `out`, a JSONL
    corpus for retriever.py. Raises CorpusError when nothing is left to write, or on any skip
    when strict."""
    out = Path(out)
    sources = _sources(paths)
    if out.resolve() in {file.resolve() for file, _ in sources}:
        raise CorpusError(f"refusing to overwrite {out}: it is one of the inputs")
    summary = Summary(out=str(out))
    written: set[str] = set()        # every passage's text written so far
    prefix_of: dict[str, Path] = {}  # id prefix -> the document that has it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # beside out, so os.replace is one rename
    try:
        with open(tmp, "w", encoding="utf-8") as sink:
            for file, prefix in tqdm(sources, desc="reading files", unit="file"):
                if file.name.startswith("."):
                    summary.skip(file, "hidden")
                    continue
                if file.name.lower().endswith(CORPUS_KINDS):  # all or nothing: a bad row raises
                    for row in read_corpus(file):
                        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                        summary.rows_copied += 1
                    summary.files_read += 1
                    continue
                try:
                    title, text = read_document(file)
                except Skipped as skipped:
                    summary.skip(file, str(skipped))
                    continue
                if prefix in prefix_of:
                    raise CorpusError(f"{prefix_of[prefix]} and {file} would both have the ids "
                                      f"{prefix}#N: pass the folder above both instead")
                prefix_of[prefix] = file
                summary.count_document(file, len(text.split()))
                for number, passage in enumerate(split_passages(text, words)):
                    if passage in written:
                        summary.duplicates += 1
                        continue
                    written.add(passage)
                    sink.write(_row(f"{prefix}#{number}", title, passage) + "\n")
        summary.passages = summary.rows_copied + len(written)
        if strict and summary.skipped:
            raise CorpusError("strict: these files were skipped:\n"
                              + "\n".join(summary.skipped_lines()))
        if summary.passages == 0:
            raise CorpusError("\n".join([f"no passages in {', '.join(map(str, paths))}"]
                                         + summary.skipped_lines()))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the build failed
    return summary


# The command's arguments: `python searchr1.py corpus PATH [PATH ...] --out my_docs.jsonl` (commands.py)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+",
                        help="files and folders (read recursively): .txt .md .html .pdf .jsonl")
    parser.add_argument("--out", required=True, help="the JSONL corpus to write, e.g. my.jsonl")
    parser.add_argument("--strict", action="store_true",
                        help="fail when any file is skipped, naming each with its reason")
    parser.add_argument("--words", type=int, default=100,
                        help="words a passage aims at; wiki-18's are 100 (default: 100)")
