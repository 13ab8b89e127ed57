"""Shared by the test files: the fixtures and helpers both use, and the test markers.

`pytest -m floor` runs the tests that touch the libraries' APIs, as .ci/run does under the oldest
versions requirements.txt allows."""
import functools
import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import rollout as rollout_chapter
import searchr1
from rollout import rollout

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"  # real files for offline tests, shipped with the project (data/README.md)
QWEN_TOKENIZER = DATA / "qwen2.5-tokenizer"

# The models here are tiny: with 2 threads, thread hand-offs cost more than they save (10-20x slower
# small ops measured on a busy 2-core machine), so the tests use one.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "floor: touches transformers, peft, accelerate or tantivy; .ci/run runs "
                                       "these under the oldest versions requirements.txt allows too")


def random_qwen2(vocab_size=128, seed=0, **overrides):
    """A random-weight Qwen2 small enough for the CPU, built from a config (no download)."""
    torch.manual_seed(seed)
    config = Qwen2Config(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True), **overrides})
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random Qwen2 with the real Qwen2.5 tokenizer, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    random_qwen2(vocab_size=151936).save_pretrained(folder)
    AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list, compress: bool = False) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def model():
    """A 2-layer Qwen2 with random weights and Qwen2.5's vocabulary size, so every tokenizer id is valid."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# The reference's strings, byte for byte (docs/reference.md)
REFERENCE_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> "
    "query </search> and it will return the top searched results between <information> and </information>. You can "
    "search as many times as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: {question}\n"
)


# Qwen2.5's chat template around a user message. The default system line is the instruct models' (the
# tokenizer in data/); the base models' tokenizers say "You are a helpful assistant." (REFERENCE_CASE_PROMPT)
QWEN_INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


QWEN_CHAT = ("<|im_start|>system\n" + QWEN_INSTRUCT_SYSTEM + "<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
             "<|im_start|>assistant\n")


# The prompt of the reference's base-model run (Search-R1's example/case.txt), up to the response
REFERENCE_CASE_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    + "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> "
    "query </search> and it will return the top searched results between <information> and </information>. You can "
    "search as many times as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: paul walkers cars in fast and furious list?\n<|im_end|>\n<|im_start|>assistant\n")


REFERENCE_INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)


def write_task(folder: Path, n_questions=8):
    """A 3-passage corpus and QA files whose golden answer is "y"."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\npassage number {i}'}) + "\n"
                              for i in range(3)))
    qa = folder / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question {i}", "golden_answers": ["y"]}) + "\n"
                          for i in range(n_questions)))
    return corpus, qa


def answer_every_other(tokenizer):
    """A logits hook that makes even rows answer "y" and odd rows "z": groups with mixed rewards."""
    targets = [tokenizer.encode(f"<answer> {a} </answer>") for a in ("y", "z")]
    def hook(logits, rows, turn, step):
        forced = torch.full_like(logits, -1e9)
        for i, row in enumerate(rows.tolist()):
            target = targets[row % 2]
            forced[i, target[step] if step < len(target) else tokenizer.eos_token_id] = 0.0
        return forced
    return hook


def steer_rollouts(set_attribute, replacement) -> None:
    """Every rollout the project makes calls `replacement` instead: the training step (searchr1),
    the evaluation (agent), ask (commands) all call it as rollout.rollout, through the module.
    set_attribute: monkeypatch.setattr in a test, plain setattr in a spawned process."""
    set_attribute(rollout_chapter, "rollout", replacement)


def steered(monkeypatch, tokenizer):
    """Every rollout answers "y" on even rows and "z" on odd ones (answer_every_other)."""
    steer_rollouts(monkeypatch.setattr, functools.partial(rollout, logits_hook=answer_every_other(tokenizer)))


def tiny_config(model_dir, folder, **overrides):
    corpus, qa = write_task(folder)
    settings = dict(model=str(model_dir), train_data=str(qa), eval_data=str(qa), corpus=str(corpus),
                    index_dir=str(folder / "index"), out_dir=str(folder / "run"), device="cpu",
                    batch_size=2, group_size=4, mini_batch_size=4, micro_batch_size=3, rollout_batch_size=16, lr=1e-2,
                    max_turns=1, max_new_tokens=8, eval_size=2, eval_batch_size=2, steps=2,
                    save_every=1, eval_every=0)
    settings.update(overrides)
    return searchr1.Config(**settings)


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path, monkeypatch):
    """A finished 2-step GRPO run (a checkpoint every step, 2 samples a step), and its config."""
    steered(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir))
    cfg = tiny_config(tiny_model_dir, tmp_path, load_4bit=False, samples=2)
    searchr1.train(cfg)
    return cfg
