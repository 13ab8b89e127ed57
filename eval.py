"""Chapter 4: how an answer is scored, and where the questions come from.

Search-R1 is trained on the outcome only: the reward of a trajectory is 1 when the answer it
gives matches a golden answer exactly (after normalisation), else 0. The same exact match (EM) is
the paper's evaluation metric on its seven QA benchmarks.

    extract_answer   the content of the LAST <answer>...</answer> in the model's response
    normalize_answer lowercase, drop ASCII punctuation, drop the words a/an/the, collapse spaces
    exact_match      1.0 if the normalised answer equals any normalised golden answer
    sub_exact_match  1.0 if any normalised golden answer is contained in the normalised answer
    token_f1         best bag-of-tokens F1 against the golden answers

QA data is FlashRAG's JSONL, one question a line: {"id", "question", "golden_answers": [...]},
read from a local file or from the hub dataset RUC-NLPIR/FlashRAG_datasets.

Where this departs from the reference scorer: Search-R1 scores prompt + response and so needs
two <answer> matches (its prompt shows the example "<answer> Beijing </answer>"); here only the
response is scored, where the last match is the model's own answer.
"""
import json
import re
import string
from collections import Counter
from pathlib import Path

# The seven benchmarks of the paper, and the split it reports on (SPEC section 6).
BENCHMARKS = {
    "nq": "test", "triviaqa": "test", "popqa": "test",                        # single-hop
    "hotpotqa": "dev", "2wikimultihopqa": "dev", "musique": "dev", "bamboogle": "test",  # multi-hop
}
TRAIN_SETS = [("nq", "train"), ("hotpotqa", "train")]  # merged into the training set
HUB_DATASETS = "RUC-NLPIR/FlashRAG_datasets"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII punctuation only


def extract_answer(response: str) -> str | None:
    """The stripped content of the last <answer>...</answer> in the response, or None."""
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    if prediction is None:
        return 0.0
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(g) for g in golden_answers))


def sub_exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    if prediction is None:
        return 0.0
    prediction = normalize_answer(prediction)
    return float(any(normalize_answer(g) in prediction for g in golden_answers))


def token_f1(prediction: str | None, golden_answers: list[str]) -> float:
    """max over golden answers of F1 = 2PR / (P + R) on normalised whitespace tokens."""
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for golden in golden_answers:
        golden_tokens = normalize_answer(golden).split()
        common = sum((Counter(predicted) & Counter(golden_tokens)).values())
        if common:
            precision, recall = common / len(predicted), common / len(golden_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


class DataError(ValueError):
    """A QA or corpus file that cannot be used; the message names the file and line."""


def read_qa_file(path: str | Path) -> list[dict]:
    """Rows {"id", "question", "golden_answers"} of a FlashRAG JSONL file, checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such QA file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            question, golden = row.get("question"), row.get("golden_answers")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{where}: field 'question' must be a non-empty string")
            if (not isinstance(golden, list) or not golden
                    or not all(isinstance(g, str) for g in golden)):
                raise DataError(f"{where}: field 'golden_answers' must be a non-empty list of strings")
            rows.append({"id": str(row.get("id", f"{path.stem}_{line_number}")),
                         "question": question, "golden_answers": golden})
    if not rows:
        raise DataError(f"{path}: no questions in the file")
    return rows


def load_qa(source: str, split: str | None = None) -> list[dict]:
    """QA rows from a local JSONL path, or from the hub by benchmark name ("nq", "hotpotqa", ...).

    A hub name uses the paper's split unless `split` is given ("nq" -> nq/test.jsonl).
    """
    if Path(source).exists() or source.endswith((".jsonl", ".json")):
        return read_qa_file(source)
    split = split or BENCHMARKS.get(source)
    if split is None:
        raise DataError(f"unknown dataset {source!r}: not a file, and not one of "
                        f"{', '.join(BENCHMARKS)} (give --split for other hub datasets)")
    from huggingface_hub import hf_hub_download  # only needed for hub data
    path = hf_hub_download(HUB_DATASETS, f"{source}/{split}.jsonl", repo_type="dataset")
    return read_qa_file(path)
