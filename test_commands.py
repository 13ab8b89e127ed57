"""The commands that use a trained agent (eval, ask, plot, export, the command line) and the search
server (search_api.py): small, seeded, offline, each named for the behaviour it proves. Shared
fixtures: conftest.py."""

import functools
import http.client
import http.server
import io
import json
import math
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import agent
import cli
import commands
import policy
import rollout as rollout_chapter
import runs
import search_api
import searchr1
from conftest import (DATA, QWEN_CHAT, QWEN_TOKENIZER, REFERENCE_PROMPT, ROOT, answer_every_other,
                      steer_rollouts, write_task)
from retriever import BM25Index, format_passages
from rollout import build_prompt, rollout
from search_api import MAX_BODY_BYTES, MAX_QUERIES, RemoteIndex, SearchServer, SearchUnavailable


# ================================================== the commands: eval, ask, plot, the command line

@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--group-size", "1"], "--group-size 1: GRPO compares at least 2"),
    (["--top-p", "1.5"], "--top-p 1.5: must be above 0 and at most 1"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--max-turns", "-1"], "--max-turns -1: must be at least 0"),
    (["--warmup-ratio", "nan"], "--warmup-ratio nan: must be between 0 and 1"),
    (["--algo", "dpo"], "--algo 'dpo': choose one of grpo, ppo"),
    (["eval", "--limit", "-1"], "--limit -1: must be at least 0"),
    (["eval", "--topk", "0"], "--topk 0: must be at least 1"),
    (["ask", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["serve", "--port", "70000"], "--port 70000: must be 0"),
])
def test_a_bad_number_is_one_line_and_exit_code_2_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere
    assert searchr1.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_commands_and_each_command_shows_only_its_own_flags(capsys):
    assert searchr1.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"\n  {name} " in listing for name in searchr1.COMMANDS)
    def flags_of(command):
        with pytest.raises(SystemExit):
            searchr1.main([command, "--help"])
        return set(re.findall(r"--[a-z0-9-]+", capsys.readouterr().out))
    train, evaluate, serve = flags_of("train"), flags_of("eval"), flags_of("serve")
    assert {"--lr", "--group-size", "--mini-batch-size", "--entropy-coef"} <= train
    assert {"--max-turns", "--adapter", "--datasets", "--limit"} <= evaluate and "--lr" not in evaluate
    assert serve == {"--help", "--corpus", "--index-dir", "--topk", "--host", "--port"}


def test_python_older_than_3_11_is_told_so_in_one_line():
    with pytest.raises(SystemExit, match="searchr1 needs Python 3.11 or newer; this is Python 3.10.12"):
        searchr1.require_python((3, 10, 12))
    searchr1.require_python((3, 11, 0))  # passes


def test_plot_draws_several_runs_metrics_in_one_png(finished_run, tmp_path):
    run = Path(finished_run.out_dir)
    png = tmp_path / "figure.png"
    assert searchr1.main(["plot", str(run), str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert searchr1.main(["plot", str(tmp_path)]) == 2  # not a run folder: one line, exit code 2


# The baselines' prompts README documents, written out in full (Search-R1's own: REFERENCE_PROMPT)
DIRECT = ("Answer the given question. Provide the answer inside <answer> and </answer>, without detailed "
          "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")


RAG = ("Answer the given question using the documents below. Provide the answer inside <answer> and </answer>, "
       "without detailed illustrations. For example, <answer> Beijing </answer>.\n"
       "Documents:\n{passages}\nQuestion: {question}\n")


def steer(monkeypatch, steering, seen=None):
    """Every rollout the project makes, with `steering` applied to the logits before any hook of the
    caller's (ask prints through one); `seen` collects (decoded prompts, max_turns) of every call."""
    def steered_rollout(model, tokenizer, prompts, search, cfg, logits_hook=None, **kwargs):
        if seen is not None:
            seen.append(([tokenizer.decode(p) for p in prompts], cfg.max_turns))
        def hook(logits, rows, turn, step):
            logits = steering(logits, rows, turn, step)
            return logits_hook(logits, rows, turn, step) if logits_hook else logits
        return rollout(model, tokenizer, prompts, search, cfg, logits_hook=hook, **kwargs)
    steer_rollouts(monkeypatch.setattr, steered_rollout)


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
    # --chat auto and the Qwen2.5 tokenizer: every method's prompt is the user turn of its template
    assert direct == QWEN_CHAT.format(user=DIRECT.format(question="question 0?"))
    # RAG: the top-k of the question itself; only passage 0 holds a word of "question 0"
    assert rag == QWEN_CHAT.format(user=RAG.format(question="question 0?",
                                                   passages='Doc 1(Title: "T0") passage number 0'))
    assert search_r1 == QWEN_CHAT.format(user=REFERENCE_PROMPT.format(question="question 0?"))
    assert [max_turns for _, max_turns in evaluated["seen"]][:6] == [0, 0, 0, 0, 1, 1]  # baselines: no search turn


def test_chat_models_get_the_baseline_prompt_as_their_user_message(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = rollout_chapter.encode_prompt(DIRECT.format(question="q?"), tokenizer, chat=True)
    assert tokenizer.decode(ids).endswith(
        "<|im_start|>user\n" + DIRECT.format(question="q?") + "<|im_end|>\n<|im_start|>assistant\n")


def test_a_resumed_eval_skips_finished_cells_and_redoes_cells_whose_settings_changed(
        tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    steer(monkeypatch, answer_every_other(AutoTokenizer.from_pretrained(tiny_model_dir)))
    argv = eval_argv(tiny_model_dir, tmp_path, [write_qa(tmp_path / "one.jsonl", ["y", "z"]),
                                                write_qa(tmp_path / "two.jsonl", ["y"])],
                     "--methods", "direct,search-r1")
    real_evaluate, real_load_agent = agent.evaluate, agent.load_agent
    evaluated, loads, killed = [], [], []
    def evaluate(*args, desc, **kwargs):
        evaluated.append(desc)
        if desc == "direct two" and not killed:  # the first run dies in its third cell
            killed.append(desc)
            raise RuntimeError("killed")
        return real_evaluate(*args, desc=desc, **kwargs)
    monkeypatch.setattr(commands, "evaluate", evaluate)
    monkeypatch.setattr(commands, "load_agent", lambda *args: loads.append(1) or real_load_agent(*args))
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


@pytest.mark.floor
def test_adapter_is_read_from_a_checkpoint_or_the_latest_of_a_run(tiny_model_dir, tmp_path):
    cfg = searchr1.Config(model=str(tiny_model_dir), load_4bit=False, device="cpu", lora_r=4, lora_alpha=8,
                          gradient_checkpointing=False)
    _, trained = policy.load_policy(cfg, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B = 0 in a fresh adapter: make this one differ from the base
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runs.save_checkpoint(tmp_path / "run", 3, trained, optimizer, scheduler)
    expected = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    # the default Config has rank 16: the rank comes from the adapter's own config
    default = searchr1.Config(model=str(tiny_model_dir), load_4bit=False, device="cpu")
    for adapter in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000003"):
        _, model = agent.load_agent(default, str(adapter), torch.device("cpu"))
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    with pytest.raises(cli.UsageError, match="no adapter_config.json"):
        agent.load_agent(default, str(tmp_path), torch.device("cpu"))


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
    monkeypatch.setattr(commands, "build_prompt", lambda q, *args: asked.append(q) or build_prompt(q, *args))
    monkeypatch.setattr(sys, "stdin", io.StringIO("question 1\nquestion 2\n\nquestion 3\n"))
    assert searchr1.main(ask_argv(tiny_model_dir, tmp_path)) == 0
    assert asked == ["question 1", "question 2"]
    assert capsys.readouterr().out.count("answer: y  (0 searches)") == 2


# ================================= search_api.py: the server, the client, training against a server

# Passage tokens (lowercased, stopwords gone; the title line is indexed too) and lengths |d|:
#   0 paris paris capital france               4
#   1 lyon lyon city france saone river        6   (two lines of text; "saône" is one token)
#   2 berlin berlin capital germany            4
#   3 rhine rhine river germany france         5   N = 4, avgdl = 19 / 4
SAPI_ROWS = [
    {"id": "0", "contents": '"Paris"\nParis, capital of France.'},
    {"id": "1", "contents": '"Lyon"\nLyon is a city in France.\nOn the Saône river.'},
    {"id": "2", "contents": '"Berlin"\nBerlin, capital of Germany.'},
    {"id": "3", "contents": '"Rhine"\nThe Rhine: a river of Germany and France.'},
]


SAPI_QUERIES = ["capital of France", "", "the", "Rhine river"]  # "" and "the" have no tokens


def sapi_bm25(terms: list[tuple[int, int]], length: int, N=4, avgdl=19 / 4, k1=1.2, b=0.75) -> float:
    """BM25 of one passage: terms = (tf in the passage, passages holding the term), |d| = length."""
    return sum(math.log(1 + (N - n + 0.5) / (n + 0.5)) * tf * (k1 + 1)
               / (tf + k1 * (1 - b + b * length / avgdl)) for tf, n in terms)


def sapi_document(i: int) -> dict:
    title, text = {"0": ('"Paris"', "Paris, capital of France."),
                   "1": ('"Lyon"', "Lyon is a city in France.\nOn the Saône river."),
                   "2": ('"Berlin"', "Berlin, capital of Germany."),
                   "3": ('"Rhine"', "The Rhine: a river of Germany and France.")}[str(i)]
    return {"id": str(i), "contents": f"{title}\n{text}", "title": title, "text": text}


@pytest.fixture(scope="module")
def sapi_index(tmp_path_factory) -> BM25Index:
    folder = tmp_path_factory.mktemp("sapi")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in SAPI_ROWS))
    return BM25Index.open(corpus, folder / "index")


@pytest.fixture
def sapi_serving():
    """start(index) -> a SearchServer answering on 127.0.0.1 (free port) from a thread; all stopped after."""
    servers = []
    def start(index, server_class=SearchServer):
        server = server_class(index, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server
    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def sapi_post(server, body: bytes, path="/retrieve", method="POST", length: str | None = "auto"):
    """One raw request on a fresh connection -> (status, headers, JSON answer)."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        connection.putrequest(method, path)
        if length is not None:
            connection.putheader("Content-Length", str(len(body)) if length == "auto" else length)
        connection.endheaders(body if length == "auto" else None)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_server_answers_a_batch_in_search_r1s_layout_with_the_in_process_passages_and_scores(
        sapi_index, sapi_serving):
    server = sapi_serving(sapi_index)
    request = {"queries": SAPI_QUERIES, "topk": None, "return_scores": True}  # topk null: the default, 3
    status, headers, answer = sapi_post(server, json.dumps(request).encode())
    capital, france = (1, 2), (1, 3)  # (tf, passages holding the term)
    expected = {"result": [
        [{"document": sapi_document(0), "score": pytest.approx(sapi_bm25([capital, france], 4), rel=1e-6)},
         {"document": sapi_document(2), "score": pytest.approx(sapi_bm25([capital], 4), rel=1e-6)},
         {"document": sapi_document(3), "score": pytest.approx(sapi_bm25([france], 5), rel=1e-6)}],
        [],
        [],
        [{"document": sapi_document(3), "score": pytest.approx(sapi_bm25([(2, 1), (1, 2)], 5), rel=1e-6)},
         {"document": sapi_document(1), "score": pytest.approx(sapi_bm25([(1, 2)], 6), rel=1e-6)}],
    ]}
    assert (status, headers["Content-Type"]) == (200, "application/json")
    assert answer == expected
    # exactly what in-process search returns: same passages, same order, scores equal to the bit
    in_process = sapi_index.search(SAPI_QUERIES, k=3)
    assert [[item["document"] | {"score": item["score"]} for item in items]
            for items in answer["result"]] == in_process

    request = {"queries": SAPI_QUERIES, "topk": 1}  # no return_scores: the document objects alone
    assert sapi_post(server, json.dumps(request).encode())[2] == {
        "result": [[sapi_document(0)], [], [], [sapi_document(3)]]}


def test_observation_built_from_the_servers_answer_equals_the_in_process_one(sapi_index, sapi_serving):
    server = sapi_serving(sapi_index)
    local = agent.make_search(searchr1.Config(corpus=str(Path(sapi_index.index_dir).parent / "corpus.jsonl"),
                                                 index_dir=str(sapi_index.index_dir)))
    remote = agent.make_search(searchr1.Config(search_url=server.url))
    assert remote(SAPI_QUERIES) == local(SAPI_QUERIES)
    assert remote(["Lyon"])[0] == 'Doc 1(Title: "Lyon") Lyon is a city in France.\nOn the Saône river.'


def test_observations_from_the_server_equal_in_process_ones_on_real_wiki18_and_nq(sapi_serving, tmp_path):
    index = BM25Index.open(DATA / "wiki18-sample-1000.jsonl", tmp_path / "wiki")
    questions = [json.loads(line)["question"] for line in (DATA / "nq-test-17.jsonl").open()]
    remote = RemoteIndex(sapi_serving(index).url)
    for k in (1, 3, 10):
        from_server, in_process = remote.search(questions, k), index.search(questions, k)
        assert from_server == in_process
        assert [format_passages(h) for h in from_server] == [format_passages(h) for h in in_process]


BAD_REQUESTS = {  # what is wrong -> (request body, HTTP status, words the error must hold)
    "invalid JSON": (b'{"queries": [', 400, "not valid JSON"),
    "invalid UTF-8": (b'{"queries": ["\xff"]}', 400, "not valid JSON"),
    "not an object": (b'["who?"]', 400, "JSON object"),
    "no queries": (b'{"topk": 3}', 400, "'queries' must be a list of strings (it is missing)"),
    "queries not a list": (b'{"queries": "who?"}', 400, "'queries' must be a list"),
    "query not a string": (b'{"queries": ["who?", 7]}', 400, "queries[1] must be a string, got int"),
    "topk 0": (b'{"queries": ["who?"], "topk": 0}', 400, "'topk' must be an integer from 1 to 100"),
    "topk above the cap": (b'{"queries": ["who?"], "topk": 101}', 400, "got 101"),
    "topk a string": (b'{"queries": ["who?"], "topk": "3"}', 400, "'topk'"),
    "topk a bool": (b'{"queries": ["who?"], "topk": true}', 400, "'topk'"),
    "return_scores not a bool": (b'{"queries": ["q"], "return_scores": "yes"}', 400, "'return_scores'"),
    "too many queries": (json.dumps({"queries": ["q"] * (MAX_QUERIES + 1)}).encode(), 413,
                         f"{MAX_QUERIES + 1:,} queries in one request; at most {MAX_QUERIES:,}"),
}


@pytest.mark.parametrize("problem", list(BAD_REQUESTS))
def test_a_bad_body_gets_its_4xx_a_json_error_one_log_line_and_the_server_keeps_serving(
        problem, sapi_index, sapi_serving, capsys):
    server = sapi_serving(sapi_index)
    body, expected_status, words = BAD_REQUESTS[problem]
    status, headers, answer = sapi_post(server, body)
    assert (status, headers["Connection"]) == (expected_status, "close")
    assert list(answer) == ["error"] and words in answer["error"]
    good = sapi_post(server, json.dumps({"queries": ["Rhine"], "topk": 1}).encode())
    assert good[:1] == (200,) and good[2]["result"] == [[sapi_document(3)]]
    log = capsys.readouterr().err.splitlines()  # one line for the error, none for the good request
    assert len(log) == 1 and f"{expected_status} POST: {answer['error']}" in log[0]


@pytest.mark.parametrize("method, path, length, expected_status, words", [
    ("POST", "/search", "auto", 404, "no such path '/search'"),
    ("GET", "/retrieve", None, 405, "GET is not allowed"),
    ("PUT", "/retrieve", "auto", 405, "PUT is not allowed"),
    ("POST", "/retrieve", None, 411, "Content-Length header is required"),
    ("POST", "/retrieve", "twelve", 400, "Content-Length must be a byte count"),
    ("POST", "/retrieve", str(MAX_BODY_BYTES + 1), 413, f"at most {MAX_BODY_BYTES:,}"),
])
def test_a_wrong_path_method_or_length_gets_its_4xx_before_the_body_is_read(
        method, path, length, expected_status, words, sapi_index, sapi_serving):
    server = sapi_serving(sapi_index)
    # the 411, 400 and 413 requests send no body at all: the server must answer from the headers
    status, headers, answer = sapi_post(server, b'{"queries": ["Rhine"]}', path, method, length)
    assert status == expected_status and words in answer["error"]
    if status == 405:
        assert headers["Allow"] == "POST"
    assert sapi_post(server, json.dumps({"queries": ["Rhine"], "topk": 1}).encode())[0] == 200


def test_a_search_that_crashes_gets_a_500_without_its_traceback_and_the_server_goes_on(
        sapi_index, sapi_serving, capsys):
    class Flaky:
        calls = 0
        def search(self, queries, k):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("index file vanished")
            return sapi_index.search(queries, k)
    server = sapi_serving(Flaky())
    status, _, answer = sapi_post(server, b'{"queries": ["Rhine"]}')
    assert status == 500 and "index file vanished" not in answer["error"]
    assert "RuntimeError: index file vanished" in capsys.readouterr().err  # the log has it
    assert sapi_post(server, b'{"queries": ["Rhine"]}')[0] == 200


class SapiScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Answers POSTs from `server.script` in turn: "drop" (close without answering) or (status, body)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen += 1
        step = self.server.script.pop(0)
        if step == "drop":
            self.close_connection = True
            return
        status, body = step
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def sapi_scripted():
    """scripted(steps) -> (url, server): a fake Search-R1 server that misbehaves as told."""
    servers = []
    def scripted(script):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SapiScriptedHandler)
        server.script, server.seen = list(script), 0
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/retrieve", server
    yield scripted
    for server in servers:
        server.shutdown()
        server.server_close()


SAPI_GOOD = json.dumps({"result": [[{"document": {"id": 9, "contents": '"T"\nline one\nline two'},
                                     "score": 2}]]}).encode()  # a dense server's id/contents only


def test_client_retries_through_a_dropped_request_a_503_and_garbage_then_uses_the_answer(sapi_scripted):
    url, server = sapi_scripted(["drop", (503, b'{"error": "busy"}'), (200, b"<html>oops</html>"),
                                 (200, b'{"result": [[{"document": {}}]]}'), (200, SAPI_GOOD)])
    hits = RemoteIndex(url, timeout=5, retries=4, backoff_s=0.01).search(["q"], k=1)
    assert server.seen == 5
    assert hits == [[{"id": "9", "contents": '"T"\nline one\nline two', "title": '"T"',
                      "text": "line one\nline two", "score": 2.0}]]


def test_client_gives_up_after_its_retries_with_the_url_and_the_last_problem(sapi_scripted):
    url, server = sapi_scripted(["drop", "drop", (502, b"bad gateway")])
    with pytest.raises(SearchUnavailable, match=rf"search server {url} failed after 3 attempt\(s\): "
                                                r"HTTP 502: bad gateway"):
        RemoteIndex(url, timeout=5, retries=2, backoff_s=0.01).search(["q"])
    assert server.seen == 3


def test_client_does_not_retry_a_4xx_and_shows_the_servers_error(sapi_index, sapi_serving):
    url = sapi_serving(sapi_index).url
    with pytest.raises(SearchUnavailable, match=r"after 1 attempt\(s\): HTTP 400: .*'topk' must be"):
        RemoteIndex(url, retries=3, backoff_s=10).search(["q"], k=500)  # a retry would wait 10 s


def test_client_fails_with_the_url_when_nothing_listens():
    with socket.socket() as placeholder:  # a port that was free a moment ago, now closed
        placeholder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}/retrieve"
    start = time.monotonic()
    with pytest.raises(SearchUnavailable, match=rf"search server {url} failed after 3 attempt\(s\): "
                                                r"ConnectionRefusedError: .*Connection refused") as caught:
        RemoteIndex(url, timeout=2, retries=2, backoff_s=0.05).search(["q"])
    assert isinstance(caught.value, OSError)  # the CLI's error path: "error: ...", exit code 2
    assert 0.15 <= time.monotonic() - start < 5  # backoff 0.05 s, then 0.1 s


def test_client_keeps_its_connection_only_for_calls_in_quick_succession(sapi_index, sapi_serving, monkeypatch):
    class CountingServer(SearchServer):
        connections = 0
        def process_request(self, request, client_address):  # once per accepted connection
            self.connections += 1
            super().process_request(request, client_address)
    server = sapi_serving(sapi_index, CountingServer)
    remote = RemoteIndex(server.url)
    for _ in range(3):
        assert remote.search(["Rhine"], k=1) == sapi_index.search(["Rhine"], k=1)
    assert server.connections == 1
    assert sapi_post(server, b'{"queries": "x"}')[0] == 400  # another client's error closes only its own
    monkeypatch.setattr(search_api, "KEEP_ALIVE_S", 0.0)  # as if the calls came minutes apart
    remote.search(["Rhine"], k=1)
    assert server.connections == 3


def test_client_sends_one_request_per_batch_and_none_for_no_queries(sapi_index, sapi_serving):
    seen = []  # the queries of each search the server ran
    class Spy:
        def search(self, queries, k):
            seen.append(list(queries))
            return sapi_index.search(queries, k)
    remote = RemoteIndex(sapi_serving(Spy()).url)
    assert remote.search([], k=3) == [] and seen == []
    remote.search(SAPI_QUERIES, k=2)
    assert seen == [SAPI_QUERIES]


def test_serve_command_prints_url_and_size_answers_and_stops_cleanly_on_ctrl_c(sapi_index):
    corpus = Path(sapi_index.index_dir).parent / "corpus.jsonl"
    # A shell's background jobs start with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child puts Python's Ctrl-C handler back before running searchr1.py.
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", code, "searchr1.py", "serve", "--corpus", str(corpus),
                                "--index-dir", str(sapi_index.index_dir), "--port", "0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)  # importing torch takes a few seconds
        line = process.stdout.readline() if ready else ""
        assert line.startswith("serving 4 passages at http://127.0.0.1:"), (line, process.poll())
        url = line.split(" at ")[1].split()[0]
        assert RemoteIndex(url, retries=0).search(SAPI_QUERIES) == sapi_index.search(SAPI_QUERIES)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read() == "stopped\n"
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def sapi_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 with the real Qwen2.5 tokenizer, saved like a hub checkpoint."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("sapi-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(folder)
    return folder


def sapi_search_then_answer(tokenizer):
    """A logits hook: every trajectory searches "capital" in turn 0, then answers y (even rows) or z."""
    search = tokenizer.encode("<search> capital </search>")
    answers = [tokenizer.encode(f"<answer> {a} </answer>") for a in ("y", "z")]
    def hook(logits, rows, turn, step):
        forced = torch.full_like(logits, -1e9)
        for i, row in enumerate(rows.tolist()):
            target = search if turn == 0 else answers[row % 2]
            forced[i, target[step] if step < len(target) else tokenizer.eos_token_id] = 0.0
        return forced
    return hook


def test_training_that_loses_its_search_server_saves_its_last_step_and_resumes_when_it_is_back(
        sapi_model_dir, sapi_index, sapi_serving, tmp_path, monkeypatch, capsys):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    steer_rollouts(monkeypatch.setattr, functools.partial(
        rollout, logits_hook=sapi_search_then_answer(AutoTokenizer.from_pretrained(sapi_model_dir))))
    monkeypatch.setattr(agent, "RemoteIndex", functools.partial(RemoteIndex, retries=1, backoff_s=0.01))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question {i}", "golden_answers": ["y"]}) + "\n"
                          for i in range(4)))
    run_dir = tmp_path / "run"
    def train(url, *extra):
        return searchr1.main(["train", "--model", str(sapi_model_dir), "--search-url", url, "--out-dir", str(run_dir),
                              "--train-data", str(qa), "--eval-data", str(qa), "--device", "cpu",
                              "--no-load-4bit", "--no-gradient-checkpointing", "--batch-size", "2",
                              "--group-size", "2", "--mini-batch-size", "4", "--micro-batch-size", "4",
                              "--max-turns", "1", "--max-new-tokens", "8", "--eval-size", "2",
                              "--eval-batch-size", "2", "--steps", "2", "--save-every", "10",
                              "--eval-every", "0", "--lr", "1e-2", *extra])

    server = sapi_serving(sapi_index)
    real_step = searchr1.train_step
    after_step_1 = {}  # the adapter as step 1 left it
    def lose_the_server_after_step_1(model, *args):
        if after_step_1:
            server.shutdown()
            server.server_close()
        stats = real_step(model, *args)
        after_step_1.update({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
        return stats
    monkeypatch.setattr(searchr1, "train_step", lose_the_server_after_step_1)
    assert train(server.url) == 2  # the CLI's error path
    out, err = capsys.readouterr()
    assert f"error: search server {server.url} failed after 2 attempt(s)" in err
    assert f"search failed: saved step 1 to {run_dir}; continue with --resume" in out + err
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 1  # save_every 10: the failure saved it
    saved = load_file(checkpoints / "step-000001" / "adapter_model.safetensors")
    # the failed step changed nothing: what was saved is the adapter step 1 left
    assert saved.keys() == after_step_1.keys() and all(torch.equal(saved[k], after_step_1[k]) for k in saved)
    assert torch.load(checkpoints / "step-000001" / "trainer_state.pt", weights_only=True)["step"] == 1
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()] == [1]

    monkeypatch.setattr(searchr1, "train_step", real_step)
    assert train(sapi_serving(sapi_index).url, "--resume") == 0  # the server is back (on a new port)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["searches"] == 1.0 for r in rows)
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2


