"""Chapter 4: how an answer is scored, and where the questions come from.

Search-R1 is trained on the outcome only: the reward of a trajectory is 1 when the answer it
gives matches a golden answer exactly (after normalisation), else 0. The same exact match (EM) is
the paper's evaluation metric on its seven QA benchmarks.

    extract_answer   the content of the LAST <answer>...</answer> in the model's response
    normalize_answer lowercase, drop ASCII punctuation, drop the words a/an/the, collapse spaces
    exact_match      1.0 if the normalised answer equals any normalised golden answer
    reward           a trajectory's reward and its parts: the exact match of its answer
    sub_exact_match  1.0 if any normalised golden answer is contained in the normalised answer
    token_f1         best bag-of-tokens F1 against the golden answers

QA data is FlashRAG's JSONL, one question a line: {"id", "question", "golden_answers": [...]},
read from a local file or from the hub dataset RUC-NLPIR/FlashRAG_datasets.

Evaluation (`python searchr1.py eval`) runs three methods, as the paper compares them (section 4):
    direct      the model answers from what it knows: DIRECT_PROMPT, one turn, no search
    rag         the top-k passages retrieved once with the question go into RAG_PROMPT, one turn
    search-r1   Search-R1's prompt and the multi-turn rollout, searching when the model asks
Each answer is one `prediction` row (question, golden answers, response, extracted answer,
searches, EM); `summarize` averages rows and `em_table` lays the EMs out as the paper's table.

Where this departs from the reference scorer: Search-R1 scores prompt + response and so needs
two <answer> matches (its prompt shows the example "<answer> Beijing </answer>"); here only the
response is scored, where the last match is the model's own answer. The paper does not print its
baselines' prompts; the two here reuse Search-R1's wording and answer format, so that the only thing
that changes between the three methods is where the passages come from.
"""
import json
import re
import string
from collections import Counter
from pathlib import Path

# The seven benchmarks of the paper, and the split it reports on (docs/reference.md).
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


def reward(response: str, golden_answers: list[str]) -> tuple[float, dict]:
    """A trajectory's reward and its parts. Search-R1's is the outcome alone: 1 when the answer the
    response gives (its last <answer>) is an exact match of a golden answer, else 0 -- no reward for
    format or for searching. Training (searchr1.train_step) and evaluation (prediction) both take it
    from here: this is the seam to change the reward."""
    answer = extract_answer(response)
    em = exact_match(answer, golden_answers)
    return em, {"exact_match": em, "answered": float(answer is not None)}


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
    """A QA file that cannot be used; the message names the file and line."""


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
                raise DataError(f"{where}: field 'golden_answers' must be a non-empty list "
                                "of strings")
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


# ----------------------------------------------------------------------------- evaluation
# The baselines' prompts: Search-R1's answer format (<answer> ... </answer>, scored the same way)
# without the search instructions. RAG's passages are the retrieval of the question itself,
# formatted as in an <information> block (Doc 1(Title: ...) ...). Chat models get them in their
# chat template.
DIRECT_PROMPT = ("Answer the given question. Provide the answer inside <answer> and </answer>, "
                 "without detailed illustrations. For example, <answer> Beijing </answer>. "
                 "Question: {question}\n")
RAG_PROMPT = ("Answer the given question using the documents below. Provide the answer inside "
              "<answer> and </answer>, without detailed illustrations. For example, "
              "<answer> Beijing </answer>.\n"
              "Documents:\n{passages}\nQuestion: {question}\n")
# flag -> table row
METHODS = {"direct": "Direct inference", "rag": "RAG", "search-r1": "Search-R1"}


def clean_question(question: str) -> str:
    """A question as Search-R1's data code puts it in a prompt: stripped, ending in "?"."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def baseline_prompt(method: str, question: str, passages: str = "") -> str:
    """The text of a baseline's prompt; the question is cleaned as for Search-R1's prompt
    (strip, "?")."""
    question = clean_question(question)
    if method == "direct":
        return DIRECT_PROMPT.format(question=question)
    return RAG_PROMPT.format(question=question, passages=passages.strip())


def prediction(question: dict, response: str, searches: list[str], answered: bool) -> dict:
    """One evaluated question: what was asked, what the model wrote, and its exact match
    (reward's)."""
    _, parts = reward(response, question["golden_answers"])
    return {"id": question["id"], "question": question["question"],
            "golden_answers": question["golden_answers"],
            "response": response, "answer": extract_answer(response), "searches": searches,
            "answered": answered, "em": parts["exact_match"]}


def summarize(predictions: list[dict]) -> dict:
    """Means over the questions: EM, searches per question, share that ended with an <answer>."""
    n = len(predictions)
    return {"em": sum(p["em"] for p in predictions) / n,
            "searches": sum(len(p["searches"]) for p in predictions) / n,
            "answered": sum(p["answered"] for p in predictions) / n}


def em_table(em: dict[tuple[str, str], float], methods: list[str], datasets: list[str]) -> str:
    """The paper's layout in Markdown: a row per method, a column per dataset, then their
    average."""
    lines = ["| Method | " + " | ".join(datasets) + " | Avg. |",
             "|:--|" + "--:|" * (len(datasets) + 1)]
    for method in methods:
        row = [em[method, dataset] for dataset in datasets]
        cells = [f"{value:.3f}" for value in row + [sum(row) / len(row)]]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
