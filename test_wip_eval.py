"""Tests of `searchr1.py eval` (the paper's table, three methods, resumable) and `searchr1.py ask`,
on a tiny random Qwen2 with the real Qwen2.5 tokenizer and a corpus and QA files written here."""
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import searchr1
from rollout import build_prompt as real_build_prompt, rollout as real_rollout
from test_searchr1 import answer_every_other, needs_qwen_tokenizer, tiny_model_dir, write_task  # noqa: F401

pytestmark = needs_qwen_tokenizer

# The prompts README documents, written out in full
SEARCH_R1 = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> "
    "query </search> and it will return the top searched results between <information> and </information>. You can "
    "search as many times as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: {question}\n")
DIRECT = ("Answer the given question. Provide the answer inside <answer> and </answer>, without detailed "
          "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")
RAG = ("Answer the given question using the documents below. Provide the answer inside <answer> and </answer>, "
       "without detailed illustrations. For example, <answer> Beijing </answer>.\n"
       "Documents:\n{passages}\nQuestion: {question}\n")


def steer(monkeypatch, steering, seen=None):
    """searchr1.rollout with `steering` applied to the logits before any hook of the caller's (ask
    prints through one); `seen` collects (decoded prompts, max_turns) of every call."""
    def steered_rollout(model, tokenizer, prompts, search, cfg, logits_hook=None, **kwargs):
        if seen is not None:
            seen.append(([tokenizer.decode(p) for p in prompts], cfg.max_turns))
        def hook(logits, rows, turn, step):
            logits = steering(logits, rows, turn, step)
            return logits_hook(logits, rows, turn, step) if logits_hook else logits
        return real_rollout(model, tokenizer, prompts, search, cfg, logits_hook=hook, **kwargs)
    monkeypatch.setattr(searchr1, "rollout", steered_rollout)


def write_qa(path: Path, golden: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "question": f"question {i}",
                                        "golden_answers": [g]}) + "\n" for i, g in enumerate(golden)))
    return path


def eval_argv(model_dir, folder: Path, datasets: list[Path], *extra) -> list[str]:
    corpus, _ = write_task(folder)
    return ["eval", "--model", str(model_dir), "--no-load-4bit", "--device", "cpu", "--corpus", str(corpus),
            "--index-dir", str(folder / "index"), "--out-dir", str(folder / "out"), "--max-turns", "1",
            "--max-new-tokens", "8", "--eval-batch-size", "2",
            "--datasets", ",".join(str(d) for d in datasets), *extra]


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """One eval run of the three methods on two datasets; even rows answer "y", odd rows "z"."""
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("eval")
    one = write_qa(folder / "one.jsonl", ["y", "y", "y"])
    two = write_qa(folder / "two.jsonl", ["z", "z"])
    seen = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        steer(monkeypatch, answer_every_other(AutoTokenizer.from_pretrained(tiny_model_dir)), seen)
        assert searchr1.main(eval_argv(tiny_model_dir, folder, [one, two])) == 0
    return {"out": folder / "out", "seen": seen}


def read_table(path: Path) -> dict[str, list[float]]:
    """Method -> its EMs (datasets in order, then the average) from results.md."""
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0]] == ["Method", "one", "two", "Avg."]
    return {cells[0].strip(): [float(c) for c in cells[1:]] for cells in rows[1:]}


def test_eval_table_em_is_the_mean_of_the_saved_per_prediction_em(evaluated):
    table = read_table(evaluated["out"] / "results.md")
    assert list(table) == ["Direct inference", "RAG", "Search-R1"]
    all_em = []
    for method, row in zip(["direct", "rag", "search-r1"], table.values()):
        means = []
        for dataset in ["one", "two"]:
            cell = json.loads((evaluated["out"] / method / f"{dataset}.json").read_text())
            for i, p in enumerate(cell["predictions"]):  # rows of a batch of 2: even "y", odd "z"
                assert p["answer"] == ("y" if i % 2 == 0 else "z")
                assert p["em"] == float(p["answer"] in p["golden_answers"])
                assert p["response"].startswith(f"<answer> {p['answer']} </answer>") and p["searches"] == []
            em = [p["em"] for p in cell["predictions"]]
            assert cell["em"] == sum(em) / len(em)
            means.append(sum(em) / len(em))
            all_em += em
        assert row == pytest.approx([round(m, 3) for m in means] + [round(sum(means) / 2, 3)], abs=1e-9)
    assert 0 < sum(all_em) < len(all_em)  # both right and wrong answers: the mean is really checked
    assert table["Search-R1"] == pytest.approx([2 / 3, 1 / 2, 7 / 12], abs=1e-3)  # y,z,y vs y; y,z vs z


def test_the_three_methods_prompt_the_documented_layouts(evaluated):
    # the first batch of each method, in the order run: one.jsonl's questions 0 and 1
    direct, rag, search_r1 = (evaluated["seen"][i][0][0] for i in (0, 2, 4))
    assert direct == DIRECT.format(question="question 0?")
    # RAG: the top-k of the question itself; only passage 0 holds a word of "question 0"
    assert rag == RAG.format(question="question 0?", passages='Doc 1(Title: "T0") passage number 0')
    assert search_r1 == SEARCH_R1.format(question="question 0?")
    assert [max_turns for _, max_turns in evaluated["seen"]][:6] == [0, 0, 0, 0, 1, 1]  # baselines: no search turn


def test_chat_models_get_the_baseline_prompt_as_their_user_message(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = searchr1.encode_prompt(DIRECT.format(question="q?"), tokenizer, chat=True)
    assert tokenizer.decode(ids).endswith(
        "<|im_start|>user\n" + DIRECT.format(question="q?") + "<|im_end|>\n<|im_start|>assistant\n")


def test_a_resumed_eval_skips_finished_cells_and_redoes_cells_whose_settings_changed(
        tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    steer(monkeypatch, answer_every_other(AutoTokenizer.from_pretrained(tiny_model_dir)))
    argv = eval_argv(tiny_model_dir, tmp_path, [write_qa(tmp_path / "one.jsonl", ["y", "z"]),
                                                write_qa(tmp_path / "two.jsonl", ["y"])],
                     "--methods", "direct,search-r1")
    real_evaluate, real_load_agent = searchr1.evaluate, searchr1.load_agent
    evaluated, loads, killed = [], [], []
    def evaluate(*args, desc, **kwargs):
        evaluated.append(desc)
        if desc == "direct two" and not killed:  # the first run dies in its third cell
            killed.append(desc)
            raise RuntimeError("killed")
        return real_evaluate(*args, desc=desc, **kwargs)
    monkeypatch.setattr(searchr1, "evaluate", evaluate)
    monkeypatch.setattr(searchr1, "load_agent", lambda *args: loads.append(1) or real_load_agent(*args))
    with pytest.raises(RuntimeError, match="killed"):
        searchr1.main(argv)
    out = tmp_path / "out"
    finished = {path: path.read_bytes() for path in out.glob("*/one.json")}
    assert len(finished) == 2 and not (out / "direct" / "two.json").exists()

    assert searchr1.main(argv) == 0
    assert evaluated[3:] == ["direct two", "search-r1 two"]
    assert all(path.read_bytes() == text for path, text in finished.items())
    table = (out / "results.md").read_text()

    evaluated.clear(), loads.clear()
    assert searchr1.main(argv) == 0
    assert evaluated == [] and loads == []  # all done: not even the model is loaded
    assert (out / "results.md").read_text() == table

    assert searchr1.main(argv[:-2] + ["--methods", "direct", "--limit", "1"]) == 0  # another sample: again
    assert evaluated == ["direct one", "direct two"]


def test_adapter_is_read_from_a_checkpoint_or_the_latest_of_a_run(tiny_model_dir, tmp_path):
    cfg = searchr1.Config(model=str(tiny_model_dir), load_4bit=False, device="cpu", lora_r=4, lora_alpha=8,
                          gradient_checkpointing=False)
    _, trained = searchr1.load_policy(cfg, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B = 0 in a fresh adapter: make this one differ from the base
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    searchr1.save_checkpoint(tmp_path / "run", 3, trained, optimizer, scheduler)
    expected = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    # the default Config has rank 16: the rank comes from the adapter's own config
    default = searchr1.Config(model=str(tiny_model_dir), load_4bit=False, device="cpu")
    for adapter in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000003"):
        _, model = searchr1.load_agent(default, str(adapter), torch.device("cpu"))
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    with pytest.raises(searchr1.UsageError, match="no adapter_config.json"):
        searchr1.load_agent(default, str(tmp_path), torch.device("cpu"))


def scripted(tokenizer, turns: list[str]):
    """A logits hook that makes every trajectory write turns[turn], then end the turn with EOS."""
    targets = [tokenizer.encode(text) for text in turns]
    def hook(logits, rows, turn, step):
        target = targets[turn]
        forced = torch.full_like(logits, -1e9)
        forced[:, target[step] if step < len(target) else tokenizer.eos_token_id] = 0.0
        return forced
    return hook


def ask_argv(model_dir, folder: Path, *extra) -> list[str]:
    corpus, _ = write_task(folder)
    return ["ask", "--model", str(model_dir), "--no-load-4bit", "--device", "cpu", "--corpus", str(corpus),
            "--index-dir", str(folder / "index"), "--max-turns", "1", "--max-new-tokens", "24", *extra]


def test_ask_prints_reasoning_each_search_the_titles_found_and_the_answer(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    search_turn = "<think> I should look it up. </think> <search> passage number 1 </search>"
    steer(monkeypatch, scripted(tokenizer, [search_turn, "<think> Found it. </think> <answer> y </answer>"]))
    assert searchr1.main(ask_argv(tiny_model_dir, tmp_path, "question 1")) == 0
    out = capsys.readouterr().out
    printed = [out.index(text) for text in (search_turn, '[found: "T1"; ', "<think> Found it. </think>",
                                            "answer: y  (1 searches)")]
    assert printed == sorted(printed)  # in the order it happened


def test_ask_without_a_question_reads_questions_until_an_empty_line(tiny_model_dir, tmp_path, monkeypatch,
                                                                    capsys):
    from transformers import AutoTokenizer
    steer(monkeypatch, scripted(AutoTokenizer.from_pretrained(tiny_model_dir), ["<answer> y </answer>"] * 2))
    asked = []
    monkeypatch.setattr(searchr1, "build_prompt", lambda q, *args: asked.append(q) or real_build_prompt(q, *args))
    monkeypatch.setattr(sys, "stdin", io.StringIO("question 1\nquestion 2\n\nquestion 3\n"))
    assert searchr1.main(ask_argv(tiny_model_dir, tmp_path)) == 0
    assert asked == ["question 1", "question 2"]
    assert capsys.readouterr().out.count("answer: y  (0 searches)") == 2
