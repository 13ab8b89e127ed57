"""Benchmarks: `python bench.py <command>`, one function per command (`bench_<command>`).

retriever: index build time, peak memory and queries/s of searchr1's BM25 (tantivy) beside
rank-bm25's BM25Okapi, on a synthetic corpus written in Search-R1's JSONL format and read through
the real path (`BM25Index.open`). Each engine runs in a fresh child process, which reports its own
peak RSS, so no engine's memory (or the corpus generator's) counts against another. queries/s
counts the whole call: tokenizing, ranking and returning the top-3 passages' text.

rollout: rollout.rollout against rollout.rollout_plain, same model, same tokens.

The plain way is what the reference implementation's engine does: every turn, generate again over
each whole history (prompt, earlier turns, observations), prefilling it from scratch, with Hugging
Face's model.generate stopping each row at its stop string. rollout() instead continues one KV
cache, prefills only the new observation, drops sequences that finished their turn from the batch
and writes the cache in place.

Random weights write no stop tags, so what is sampled is forced by a script (the rollouts' logits
hook): each turn is `<search>` + filler + `</search>`, of the length the
script sets (the last turn's search is not run, as in Search-R1). `--lengths equal` runs every turn
to the per-turn budget; `--lengths varied` draws each turn's length from a seeded schedule, as real
stop strings make them. Both ways must produce the very same tokens; the table says whether they did.
The pieces (forced_script, script_hook) are meant for other benchmarks too.

serve: queries/s of the same BM25 index searched in-process and through `python searchr1.py serve`
(Search-R1's HTTP API, search_api.py), with 1 and with several concurrent clients, in interleaved
rounds so that load from other programs weighs on every path alike; then where an HTTP batch's
extra time goes (encoding and decoding the JSON).
"""
import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import platform
import resource
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import plan
import policy
import rollout as rollout_chapter
import runs
import searchr1
import tiny
from retriever import format_passages
from rollout import RolloutConfig, build_prompt, rollout, rollout_plain
from policy import clock, fit_to_memory, load_policy, peak_memory_gb, sampling_model, uses_chat_template

RETRIEVER_TARGETS = ("queries/s >= 30x rank-bm25's at 100k; >= 100 queries/s at 1M; "
                     "1M indexed in < 300 s with peak RSS < 8 GB")


def write_synthetic_corpus(path: Path, passages: int, queries: int, seed: int = 0) -> list[str]:
    """Write `passages` rows {"id", "contents": '"Title"\\ntext'} to path; return `queries` queries.

    Words follow Zipf's law (p(rank r) ~ 1/r) over a 200k-word vocabulary whose 100 most common
    words are dropped, as a stopword list would; 60 words a passage (2 in the title); a query is 6
    words drawn from a random passage.
    """
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{r}" for r in range(200_000)])
    cdf = np.cumsum(1.0 / np.arange(101, 200_101))
    cdf /= cdf[-1]
    query_rows = set(rng.choice(passages, size=queries, replace=False).tolist())
    query_list = []
    with open(path, "w") as out:
        for start in range(0, passages, 50_000):
            n = min(50_000, passages - start)
            words = vocab[np.searchsorted(cdf, rng.random((n, 60)))]  # (n, 60)
            for i, row in enumerate(words, start=start):
                contents = f'"{row[0]} {row[1]}"\n' + " ".join(row[2:])  # '"Title"\ntext'
                out.write(json.dumps({"id": str(i), "contents": contents}) + "\n")
                if i in query_rows:
                    query_list.append(" ".join(rng.choice(row, size=6, replace=False)))
    return query_list


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _searchr1_child(corpus: Path, index_dir: Path, queries: list[str]):
    from retriever import BM25Index
    start = time.perf_counter()
    index = BM25Index.open(corpus, index_dir)  # a fresh folder: builds
    yield {"build_s": time.perf_counter() - start, "rss_gb": _peak_rss_gb()}
    start = time.perf_counter()
    index = BM25Index.open(corpus, index_dir)  # loads the cached index (hashes the corpus)
    reopen_s = time.perf_counter() - start
    assert len(index) > 0 and all(len(hits) == 3 for hits in index.search(queries, k=3))
    seconds = []  # a warm-up batch, then the median of 5 batches
    for _ in range(6):
        start = time.perf_counter()
        index.search(queries, k=3)
        seconds.append(time.perf_counter() - start)
    qps = len(queries) / float(np.median(seconds[1:]))
    disk_gb = sum(f.stat().st_size for f in index_dir.iterdir()) / 1e9
    yield {"reopen_s": reopen_s, "qps": qps, "rss_gb": _peak_rss_gb(), "disk_gb": disk_gb}


def _rank_bm25_child(corpus: Path, index_dir: Path, queries: list[str]):
    from rank_bm25 import BM25Okapi
    from retriever import read_corpus, tokenize
    start = time.perf_counter()
    passages = list(read_corpus(corpus))  # rank-bm25 keeps no passages; we keep them to return hits
    bm25 = BM25Okapi(tokenize(passage["contents"]) for passage in passages)
    yield {"build_s": time.perf_counter() - start, "rss_gb": _peak_rss_gb()}
    start = time.perf_counter()
    for done, query in enumerate(queries, start=1):  # one batch, timed query by query: it is slow
        scores = bm25.get_scores(tokenize(query))  # (N,)
        top = np.argpartition(-scores, 3)[:3]
        hits = [passages[i] for i in top[np.argsort(-scores[top])]]
        assert len(hits) == 3
        yield {"qps": done / (time.perf_counter() - start), "queries_done": done, "rss_gb": _peak_rss_gb()}


def _child_main(child, args, connection):
    connection.send({"start_rss_gb": _peak_rss_gb()})  # the interpreter with bench.py's imports (torch)
    for measurements in child(*args):
        connection.send(measurements)


def run_in_child(child, args: tuple, cap_s: float) -> dict:
    """Run the generator child(*args) in a fresh process; merge the dicts it yields.

    Adds "stopped": None when the child finished, else why not (it ran over cap_s, or crashed).
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(child, args, send))
    process.start()
    send.close()  # the parent keeps only the reading end: recv() raises EOFError when the child ends
    deadline, result = time.monotonic() + cap_s, {"stopped": None}
    while True:
        if not receive.poll(max(deadline - time.monotonic(), 0)):
            process.kill()
            result["stopped"] = f"stopped at the {cap_s:.0f} s cap"
            break
        try:
            result.update(receive.recv())
        except EOFError:
            break
    process.join()
    if process.exitcode not in (0, -9):
        result["stopped"] = f"failed (exit code {process.exitcode})"
    return result


def bench_retriever(args):
    results = {}  # (engine, passages) -> measurements
    engines = {"searchr1 (tantivy)": _searchr1_child, "rank-bm25 BM25Okapi": _rank_bm25_child}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for size in args.sizes:
            corpus = Path(workdir) / f"synthetic-{size}.jsonl"
            start = time.perf_counter()
            queries = write_synthetic_corpus(corpus, size, args.queries, args.seed)
            print(f"wrote {size:,} passages ({corpus.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            for engine, child in engines.items():
                print(f"running {engine} on {size:,} passages ...", flush=True)
                child_args = (corpus, Path(workdir) / f"index-{size}", queries)
                results[engine, size] = run_in_child(child, child_args, args.cap_s)
            corpus.unlink()

    def cell(result, key, width, spec):
        return f"{result[key]:>{width}{spec}}" if key in result else f"{'-':>{width}}"

    print(f"\nBM25 retrieval: {args.queries} queries a batch, top-3; synthetic passages of 60 words; "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print(f"{'engine':<21}{'passages':>10}{'build s':>9}{'peak RSS GB':>13}{'queries/s':>11}"
          f"{'reopen s':>10}{'index GB':>10}  note")
    for (engine, size), r in results.items():
        note = r["stopped"] or ""
        if r["stopped"] and "queries_done" in r:
            note += f" after {r['queries_done']} of {args.queries} queries (queries/s from those)"
        print(f"{engine:<21}{size:>10,}{cell(r, 'build_s', 9, '.1f')}{cell(r, 'rss_gb', 13, '.2f')}"
              f"{cell(r, 'qps', 11, ',.1f')}{cell(r, 'reopen_s', 10, '.2f')}{cell(r, 'disk_gb', 10, '.3f')}"
              f"  {note}")

    start_rss = max(r.get("start_rss_gb", 0.0) for r in results.values())
    print(f"(peak RSS counts the child's interpreter with bench.py's imports: {start_rss:.2f} GB before any work)")
    print(f"\ntargets: {RETRIEVER_TARGETS}")
    ours, theirs = (results.get((engine, 100_000), {}) for engine in engines)
    if "qps" in ours and "qps" in theirs:
        ratio = ours["qps"] / theirs["qps"]
        print(f"  100k: queries/s {ratio:,.0f}x rank-bm25's (target >= 30x): "
              f"{'met' if ratio >= 30 else 'NOT met'}")
    big = results.get(("searchr1 (tantivy)", 1_000_000))
    if big and not big["stopped"]:
        for what, value, ok in [("queries/s (target >= 100)", f"{big['qps']:,.0f}", big["qps"] >= 100),
                                ("build s (target < 300)", f"{big['build_s']:.0f}", big["build_s"] < 300),
                                ("peak RSS GB (target < 8)", f"{big['rss_gb']:.2f}", big["rss_gb"] < 8)]:
            print(f"  1M: {what}: {value}: {'met' if ok else 'NOT met'}")



# ----------------------------------------------------------------------------- rollout
ROOT = Path(__file__).resolve().parent  # the project's folder
QWEN_TOKENIZER = ROOT / "data" / "qwen2.5-tokenizer"  # shipped with the project (data/README.md)


def forced_script(tokenizer, lengths: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """Token ids (rows, turns, longest) to force: each turn `<search>` filler `</search>`, turn t of
    row r exactly lengths[r, t] tokens long; -1 pads. (`answer` is no token below a small vocab's size.)"""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # filler: tokens of the model's vocabulary whose text holds no '<' or '>', so no stray tag appears
    filler = torch.tensor([i for i in range(min(vocab, 8192))
                           if not ({"<", ">"} & set(tokenizer.decode([i])) or i in tokenizer.all_special_ids)])
    g = torch.Generator().manual_seed(seed)
    opening, closing = encode("<search>"), encode(" </search>")
    assert max(opening + closing) < vocab, "the tags' tokens are outside the model's vocabulary"
    rows, turns = lengths.shape
    script = torch.full((rows, turns, int(lengths.max())), -1, dtype=torch.long)
    for r in range(rows):
        for t in range(turns):
            n = int(lengths[r, t]) - len(opening) - len(closing)
            assert n >= 1, f"a turn of {int(lengths[r, t])} tokens cannot hold the search tags"
            body = filler[torch.randint(len(filler), (n,), generator=g)].tolist()
            script[r, t, : lengths[r, t]] = torch.tensor(opening + body + closing)
    return script


def script_hook(script: torch.Tensor):
    """rollout's logits_hook that makes row r sample script[r, turn, step] (script on the model's device)."""
    def hook(logits, rows, turn, step):
        forced = script[rows, turn, min(step, script.shape[2] - 1)].clamp(min=0)  # (A,); rows past the end: any
        return torch.full_like(logits, float("-inf")).scatter_(1, forced[:, None], 0.0)
    return hook


class _ModuloEmbedding(torch.nn.Module):
    """Observation tags and padding are Qwen tokenizer ids beyond the small model's vocabulary: they read
    embedding row id % vocab (what is computed, and so the cost, is unchanged)."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, ids):
        return self.embedding(ids % self.embedding.num_embeddings)


def bench_rollout(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        tie_word_embeddings=False)).eval()
    model.set_input_embeddings(_ModuloEmbedding(model.get_input_embeddings()))
    cfg = RolloutConfig(max_turns=args.turns - 1, max_new_tokens=args.tokens_per_turn, max_obs_tokens=args.obs_tokens,
                        temperature=1.0, top_p=1.0, n_samples=1)
    passages = "Doc 1(Title: Bench) " + "a passage of retrieved text " * args.obs_tokens  # cut to obs-tokens
    search = lambda queries: [passages] * len(queries)  # noqa: E731
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(args.vocab, (args.trajectories, args.prompt_tokens), generator=g).tolist()
    results = []
    for mode in (["equal", "varied"] if args.lengths == "both" else [args.lengths]):
        shape = (args.trajectories, args.turns)
        lengths = (torch.full(shape, args.tokens_per_turn) if mode == "equal"
                   else torch.randint(max(8, args.tokens_per_turn // 10), args.tokens_per_turn + 1, shape, generator=g))
        script = forced_script(tokenizer, lengths, args.vocab, args.seed)
        ours = lambda n=args.trajectories: rollout(model, tokenizer, prompts[:n], search, cfg,  # noqa: E731
                                                   logits_hook=script_hook(script[:n]))
        naive = lambda n=args.trajectories: rollout_plain(model, tokenizer, prompts[:n], search, cfg,  # noqa: E731
                                                          logits_hook=script_hook(script[:n]))
        ours(4), naive(4)  # warm-up
        best = {}  # way -> (wall s, CPU s), each the least over the repeats; CPU time is steadier when shared
        for _ in range(args.repeats):
            for name, run in (("ours", ours), ("naive", naive)):
                wall, cpu = time.perf_counter(), time.process_time()
                out = run()
                took = (time.perf_counter() - wall, time.process_time() - cpu)
                best[name] = tuple(min(a, b) for a, b in zip(best.get(name, took), took))
                if name == "ours":
                    trajs = out
                else:
                    same = [t.response_ids for t in trajs] == [t.response_ids for t in out]
        sampled = sum(sum(t.loss_mask) for t in trajs)
        (ours_s, ours_cpu), (naive_s, naive_cpu) = best["ours"], best["naive"]
        results.append({"lengths": mode, "sampled_tokens": sampled, "ours_s": ours_s, "naive_s": naive_s,
                        "ours_tok_s": sampled / ours_s, "naive_tok_s": sampled / naive_s, "speedup": naive_s / ours_s,
                        "cpu_speedup": naive_cpu / ours_cpu, "same_tokens": same,
                        "outside_forward": outside_forward_share(ours) if args.profile else None})
    print(f"\nrandom Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
          f"{args.trajectories} trajectories, {args.turns} turns of <= {args.tokens_per_turn} tokens, "
          f"{args.obs_tokens}-token observations, {args.prompt_tokens}-token prompts, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print("| lengths | sampled tokens | rollout.py s | rollout.py tok/s | generate s | generate tok/s | speed-up "
          "| speed-up in CPU time | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['lengths']} | {r['sampled_tokens']} | {r['ours_s']:.1f} | {r['ours_tok_s']:.0f} "
              f"| {r['naive_s']:.1f} | {r['naive_tok_s']:.0f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x "
              f"| {'yes' if r['same_tokens'] else 'NO'} |")
    for r in results if args.profile else []:
        print(f"{r['lengths']} lengths: {r['outside_forward']:.0%} of rollout.py's time is spent outside the model's "
              "forward calls (sampling, stop-string checks, bookkeeping)")
    return results


def outside_forward_share(run) -> float:
    """The share of run()'s wall time spent outside the model's forward calls (the engine's _forward)."""
    spent, forward = [0.0], rollout_chapter._CachedDecoder._forward
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out
    with mock.patch.object(rollout_chapter._CachedDecoder, "_forward", timed):
        start = time.perf_counter()
        run()
        return 1 - spent[0] / (time.perf_counter() - start)


SERVE_TARGET = "HTTP costs at most 20% of in-process throughput at batch 256 (HTTP queries/s >= 0.8x)"


def _queries_per_s(search, batches: list[list[str]], clients: int, calls: int) -> float:
    """queries/s of `clients` threads sharing `calls` calls of search(batch, 3), batches in turn."""
    errors = []
    def client(first):
        try:
            for call in range(first, calls, clients):
                search(batches[call % len(batches)], 3)
        except Exception as error:  # re-raised below: a failed client must not pass for a fast one
            errors.append(error)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return calls * len(batches[0]) / (time.perf_counter() - start)


def _median_ms(fn, clock=time.perf_counter, repeats: int = 9) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = clock()
        fn()
        seconds.append(clock() - start)
    return 1e3 * float(np.median(seconds))


def _start_server(corpus: Path, index_dir: Path) -> tuple[subprocess.Popen, str]:
    """`python searchr1.py serve` on a free port, as a user runs it; the process and its URL."""
    server = subprocess.Popen([sys.executable, "searchr1.py", "serve", "--corpus", str(corpus),
                               "--index-dir", str(index_dir), "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([server.stdout], [], [], 300)
    line = server.stdout.readline() if ready else ""
    if not line.startswith("serving"):
        server.kill()
        raise RuntimeError(f"`searchr1.py serve` did not start; it printed {line!r}")
    return server, line.split(" at ")[1].split()[0]


def bench_serve(args):
    from retriever import BM25Index
    from search_api import RemoteIndex, parse_answer, retrieve
    modes = [("in-process", 1), ("HTTP", 1), ("in-process", args.clients), ("HTTP", args.clients)]
    rates = {mode: [] for mode in modes}  # queries/s of each round
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        corpus, index_dir = Path(workdir) / "synthetic.jsonl", Path(workdir) / "index"
        queries = write_synthetic_corpus(corpus, args.passages, args.batch * args.clients, args.seed)
        batches = [queries[i: i + args.batch] for i in range(0, len(queries), args.batch)]
        index = BM25Index.open(corpus, index_dir)
        server, url = _start_server(corpus, index_dir)  # loads the index just built
        try:
            remote = RemoteIndex(url)
            assert remote.search(batches[0]) == index.search(batches[0])  # same passages, same scores
            for round in range(args.rounds):
                print(f"round {round + 1} of {args.rounds} ...", flush=True)
                for where, clients in modes:
                    search = index.search if where == "in-process" else remote.search
                    rates[where, clients].append(_queries_per_s(search, batches, clients, args.calls))
        finally:
            server.terminate()
            server.wait()
        # CPU time of one batch, which load from other programs does not stretch: the search, and
        # the JSON work HTTP adds to it (the rest is sockets and waking threads up)
        answer = retrieve(index, batches[0], 3, return_scores=True)
        body = json.dumps(answer).encode()
        cpu_ms = {"search": _median_ms(lambda: index.search(batches[0], 3), time.thread_time),
                  "server encodes JSON": _median_ms(lambda: json.dumps(answer).encode(), time.thread_time),
                  "client decodes JSON + hits": _median_ms(lambda: parse_answer(json.loads(body), args.batch),
                                                          time.thread_time)}

    print(f"\nBM25 search in-process vs over HTTP (`searchr1.py serve`): {args.passages:,} synthetic "
          f"passages, batches of {args.batch} queries, top-3; median of {args.rounds} interleaved rounds "
          f"of {args.calls} batches; {os.cpu_count()} CPU cores, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'path':<12}{'clients':>8}{'queries/s':>11}{'ms/batch':>10}{'HTTP / in-process':>19}")
    ratios = {}
    for where, clients in modes:
        qps = float(np.median(rates[where, clients]))
        ratio = ""
        if where == "HTTP":
            ratios[f"{clients} client(s)"] = qps / float(np.median(rates["in-process", clients]))
            ratio = f"{ratios[f'{clients} client(s)']:.2f}"
        print(f"{where:<12}{clients:>8}{qps:>11,.0f}{1e3 * args.batch * clients / qps:>10.1f}{ratio:>19}")
    json_ms = cpu_ms["server encodes JSON"] + cpu_ms["client decodes JSON + hits"]
    ratios["CPU time, 1 batch"] = cpu_ms["search"] / (cpu_ms["search"] + json_ms)
    http_ms, local_ms = (1e3 * args.batch / float(np.median(rates[mode, 1])) for mode in ("HTTP", "in-process"))
    print("CPU time of one batch (ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in cpu_ms.items())
          + f" ({len(body) / 1e3:,.0f} kB of JSON)")
    print(f"1 client, wall clock: HTTP adds {http_ms - local_ms:.1f} ms a batch; JSON's CPU time is {json_ms:.1f} "
          f"of it; sockets, thread wake-ups and waiting for a core the other {http_ms - local_ms - json_ms:.1f}")
    print(f"\ntarget: {SERVE_TARGET}")
    for what, ratio in ratios.items():
        print(f"  {what}: HTTP / in-process = {ratio:.2f}: {'met' if ratio >= 0.8 else 'NOT met'}")


# ----------------------------------------------------------------------------- gpu
# The targets of a run on one 24 GB consumer card, and the shape of the model measured
GPU_TARGETS = {"peak_gb": 20, "steps_in_3h": searchr1.Config().steps}  # peak < 20 GB; the default run in 3 hours
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                 bos_token_id=151643, eos_token_id=151643)  # Qwen2.5-3B's released config and token ids
# --tiny: the same vocabulary (every id of the real tokenizer exists), a model of ~10M parameters
TINY_QWEN2 = dict(QWEN25_3B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# the lengths measured, and those of --tiny; the batch of a step is the plan's rollout chunk (one
# rollout call); a flag given on the command line wins
GPU_SIZES = dict(tokens_per_turn=500, passage_tokens=130, compare_questions=1, compare_tokens=100)
GPU_TINY_SIZES = dict(tokens_per_turn=12, passage_tokens=4, compare_questions=1, compare_tokens=12, group_size=2,
                      micro_batch_size=2, rollout_batch_size=2)
GPU_PHASES = ("step", "merged", "generate")  # in this order: the most wanted first, should time run out


def _save_random_qwen2(architecture: dict, tokenizer, folder: Path, device) -> None:
    """A Qwen2 of `architecture` with random weights, saved with `tokenizer` as a hub checkpoint is.

    Built directly on `device` in the dtype training loads it in (bf16 on CUDA: 6 GB for 3B, and no
    12 GB fp32 copy in host memory)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**architecture),
                                                 dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gpu_device(args) -> torch.device:
    """The device measured: the CPU with --tiny, else the current GPU -- indexed, as the memory cap needs
    (torch.cuda.set_per_process_memory_fraction refuses a device without an index)."""
    if args.tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA device is visible; `bench.py gpu --tiny` runs the same code on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def _measure(phase: str, fn, device, sizes: dict, failures: list[dict]):
    """(fn(), wall seconds, peak memory GB while it ran), or None when it ran out of the capped GPU memory:
    then `failures` gets the phase, its sizes, the allocator's peak and where it failed (the innermost line
    of searchr1's own modules, whichever), and the bench goes on. (On the CPU the peak is the process's.)"""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = clock(device)
    try:
        result = fn()
    except torch.OutOfMemoryError as error:
        ours = [frame for frame in traceback.extract_tb(error.__traceback__)
                if Path(frame.filename).resolve().parent == ROOT
                and not Path(frame.filename).name.startswith(("test_", "bench"))]  # searchr1's modules
        failures.append({"phase": phase, "sizes": sizes, "peak_gb": peak_memory_gb(device),
                         "where": f"{Path(ours[-1].filename).name}:{ours[-1].lineno} `{ours[-1].line}`" if ours else "",
                         "error": str(error).splitlines()[0]})
        return None
    return result, clock(device) - start, peak_memory_gb(device)


def bench_gpu(args) -> dict:
    """Is the default run on Qwen2.5-3B in 4-bit affordable on a 24 GB card? The numbers of each phase,
    printed and written to --json as soon as the phase ends, so a run cut short keeps what it measured.

    Cost does not depend on weight values, so Qwen2.5-3B is built from its config with random weights,
    saved with the real tokenizer and loaded through policy.load_policy -- NF4 4-bit, LoRA, gradient
    checkpointing, as training loads it -- with the usable GPU memory capped at --memory-cap-gb, and
    the memory plan picks the rollout chunk and micro-batch for that cap. Random weights write no stop
    tags, so a script forces what is sampled (forced_script through the rollout's logits hook): every
    turn runs to the per-turn budget (the worst case, which memory must survive), each search gets 3
    passages of ~130 tokens, and the last turn ends in `<answer> yes </answer>` on even rows and `no` on
    odd ones, so every group has rewards 1 and 0 and the update has a gradient. The phases (--phases),
    in this order:
      step      one real searchr1.train_step on one rollout chunk, timed by phase (rollout, pi_old/pi_ref
                log-probs, update), with its peak memory and the sampler's log-prob drift
      merged    one rollout of the chunk the plan picks for --rollout-weights merged, sampled from the
                16-bit merged copy (its making included)
      generate  rollout.py against rollout_plain (model.generate re-run over each whole history every
                turn) on a small chunk and short turns: the same tokens, and the speed-up
    From the step, the default run's step (Config().batch_size questions, in as many rollout calls as
    the chunk needs) and the steps that fit in 3 hours. --tiny runs all of it on the CPU with a tiny Qwen2.
    """
    for key, value in (GPU_TINY_SIZES if args.tiny else GPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = gpu_device(args)
    cuda = device.type == "cuda"
    if cuda:  # a consumer card's memory: allocations beyond the cap fail as they would there
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
    else:
        # tiny ops gain nothing from more threads, and on cores other programs share each op waits for
        # descheduled threads (measured here: 1 thread ~15x faster than 2 on a loaded 2-core machine)
        torch.set_num_threads(args.threads or 1)
    threads = torch.get_num_threads()
    r = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({threads} thread{'s' * (threads > 1)})",
         "cap_gb": args.memory_cap_gb if cuda else None, "phases": {}, "out_of_memory": []}
    def record(phase: str, numbers: dict | None) -> None:
        r["phases"][phase] = numbers
        if args.json:  # the results so far, whole, after every phase
            runs.write_atomic(Path(args.json), json.dumps(r, indent=1, default=str))

    # --- setup: the random model, loaded as training loads it, and the plan for the cap
    start = time.time()
    architecture = TINY_QWEN2 if args.tiny else QWEN25_3B
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    settings = dict(max_new_tokens=args.tokens_per_turn, seed=args.seed, device=device.type)
    settings.update({key: getattr(args, key) for key in ("group_size", "micro_batch_size", "rollout_batch_size")
                     if getattr(args, key)})
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:  # the checkpoint is gone once loaded
        _save_random_qwen2(architecture, tokenizer, Path(folder), device)
        cfg = searchr1.Config(model=folder, gpu_memory_gb=args.memory_cap_gb if cuda else 0, **settings)
        tokenizer, model = load_policy(cfg, device)
    questions = [{"question": f"What happened in town number {i}", "golden_answers": ["yes"]}
                 for i in range(cfg.batch_size)]
    cfg, budget = fit_to_memory(cfg, model, tokenizer, questions, device)
    if budget:
        print(budget.table(), flush=True)
    merged_cfg, _ = fit_to_memory(dataclasses.replace(cfg, rollout_weights="merged",
                                                      rollout_batch_size=settings.get("rollout_batch_size", 0)),
                                  model, tokenizer, questions, device)
    chunk = cfg.rollout_batch_size
    r["model"] = f"random {'tiny Qwen2' if args.tiny else 'Qwen2.5-3B'}, NF4 + LoRA r{cfg.lora_r}"
    r["plan"] = {"rollout_batch_size": chunk, "micro_batch_size": cfg.micro_batch_size,
                 "merged_rollout_batch_size": merged_cfg.rollout_batch_size if merged_cfg.rollout_weights == "merged"
                 else None}
    record("setup", {"seconds": time.time() - start})

    turns = cfg.max_turns + 1  # the setting in words goes into every JSON written from here on
    r["setting"] = (f"{r['model']}; rollout chunk {chunk} questions x {cfg.group_size} (the plan's, one rollout "
                    f"call), {turns} turns of {args.tokens_per_turn} forced tokens, observations of {cfg.topk} "
                    f"passages of {args.passage_tokens} tokens, micro-batch {cfg.micro_batch_size}, gradient "
                    f"checkpointing; " + (f"GPU memory capped at {args.memory_cap_gb:g} GiB" if cuda
                                          else "CPU: peak GB is the process's peak RSS"))

    # --- what is sampled: the script, the passages, the prompts
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    def scripted(rows: int, tokens: int):  # the hook that makes `rows` rows sample `turns` turns of `tokens`
        script = forced_script(tokenizer, torch.full((rows, turns), tokens), architecture["vocab_size"], args.seed)
        for row in range(rows):  # the last turn ends in an answer where its search tag would close
            answer = encode(f" <answer> {'no' if row % 2 else 'yes'} </answer>")
            if len(encode("<search>")) + len(answer) >= tokens:
                raise SystemExit(f"a turn of {tokens} tokens is too short for a turn with an answer")
            script[row, -1, tokens - len(answer):] = torch.tensor(answer)
        return script_hook(script.to(device))
    text = tokenizer.decode(encode("The passage tells of a town by the river, its people and their long history. "
                                   * (args.passage_tokens // 10 + 1))[: args.passage_tokens])
    passages = format_passages([{"title": f"Town {i}", "text": text} for i in range(1, cfg.topk + 1)])
    search = lambda queries: [passages] * len(queries)  # noqa: E731
    prompts = [build_prompt(q["question"], tokenizer, uses_chat_template(cfg, tokenizer)) for q in questions]
    rollout_cfg = cfg.rollout_config()
    model.eval()
    warm = dataclasses.replace(rollout_cfg, max_new_tokens=4)  # warm-up: kernels, allocator, caches
    for way in (rollout, rollout_plain):
        way(model, tokenizer, prompts[:1], search, warm, logits_hook=scripted(cfg.group_size, args.compare_tokens))

    def generate():
        n, short = args.compare_questions, dataclasses.replace(rollout_cfg, max_new_tokens=args.compare_tokens)
        hook, seconds, out = scripted(n * cfg.group_size, args.compare_tokens), {}, {}
        for way, run in (("ours", rollout), ("generate", rollout_plain)):
            start = clock(device)
            out[way] = [t.response_ids for t in run(model, tokenizer, prompts[:n], search, short, logits_hook=hook)]
            seconds[way] = clock(device) - start
        sampled = n * cfg.group_size * turns * args.compare_tokens
        return {"questions": n, "tokens_per_turn": args.compare_tokens, "ours_tok_s": sampled / seconds["ours"],
                "generate_tok_s": sampled / seconds["generate"], "ratio": seconds["generate"] / seconds["ours"],
                "same_tokens": out["ours"] == out["generate"]}

    def step():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0)
        before = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        forced = functools.partial(rollout, logits_hook=scripted(chunk * cfg.group_size, args.tokens_per_turn))
        with mock.patch.object(rollout_chapter, "rollout", forced):
            stats, trajectories, _ = searchr1.train_step(model, tokenizer, optimizer, questions[:chunk], search,
                                                         cfg, device)
        changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[name])]
        return {**{key: stats[key] for key in ("rollout_s", "logprob_s", "update_s", "step_s", "reward", "logp_drift",
                                               "logp_drift_max")},
                "questions": chunk, "sampled_tokens": sum(sum(t.loss_mask) for t in trajectories),
                "forced_tokens": chunk * cfg.group_size * turns * args.tokens_per_turn,
                "response_tokens": max(len(t.response_ids) for t in trajectories),
                "changed_lora": sum("lora_" in name for name in changed),
                "changed_frozen": sum("lora_" not in name for name in changed)}

    def merged():
        n = r["plan"]["merged_rollout_batch_size"]
        start = clock(device)
        with sampling_model(model, merged_cfg, device) as copy:
            made = clock(device)
            trajectories = rollout(copy, tokenizer, prompts[:n], search, rollout_cfg,
                                   logits_hook=scripted(n * cfg.group_size, args.tokens_per_turn))
            end = clock(device)
        sampled = sum(sum(t.loss_mask) for t in trajectories)
        return {"questions": n, "copy_s": made - start, "rollout_s": end - made, "tok_s": sampled / (end - start),
                "ms_per_decode_step": 1e3 * (end - made) / (turns * args.tokens_per_turn)}

    group = {"group_size": cfg.group_size}  # what each phase ran, for its out-of-memory record
    sizes = {"step": {"questions": chunk, **group, "micro_batch_size": cfg.micro_batch_size,
                      "tokens_per_turn": args.tokens_per_turn},
             "merged": {"questions": r["plan"]["merged_rollout_batch_size"], **group,
                        "tokens_per_turn": args.tokens_per_turn},
             "generate": {"questions": args.compare_questions, **group, "tokens_per_turn": args.compare_tokens}}
    for phase, run in (("step", step), ("merged", merged), ("generate", generate)):
        if phase not in args.phases or (phase == "merged" and not r["plan"]["merged_rollout_batch_size"]):
            continue
        measured = _measure(phase, run, device, sizes[phase], r["out_of_memory"])
        record(phase, measured and {**measured[0], "seconds": measured[1], "peak_gb": measured[2]})
    if r["phases"].get("step"):
        record("run", gpu_run(r["phases"]["step"], searchr1.Config().batch_size, turns, args.tokens_per_turn))
    if args.profile and r["phases"].get("step"):  # one more step under the profiler: where its seconds go
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
            step()
        order = "self_device_time_total" if cuda else "self_cpu_time_total"
        r["profile"] = (f"profile of one more train_step, top ops by {order}:\n"
                        + profiler.key_averages().table(sort_by=order, row_limit=args.profile_rows))
    gpu_print(r)
    return r


def gpu_run(step: dict, questions: int, turns: int, tokens_per_turn: int) -> dict:
    """The default run's step from the measured one: as many rollout calls as its questions need chunks,
    each taken to cost what the measured call cost (decoding here is bound by kernel launches, one per
    op per token, not by the rows in the batch: an assumption a run at two chunk sizes would test), and
    the log-prob and update passes scaled by the trajectories."""
    calls = -(-questions // step["questions"])
    share = questions / step["questions"]
    step_s = calls * step["rollout_s"] + share * (step["logprob_s"] + step["update_s"])
    return {"questions": questions, "rollout_calls": calls, "step_s": step_s, "steps_in_3h": 3 * 3600 / step_s,
            "ms_per_decode_step": 1e3 * step["rollout_s"] / (turns * tokens_per_turn)}


def gpu_print(r: dict) -> None:
    """bench_gpu's results: each phase's numbers (or where it ran out of memory), the default run, the targets."""
    phases = r["phases"]
    print(f"\n{r['device']}: {r['setting']}")
    if g := phases.get("generate"):
        print(f"generate ({g['questions']} question, {g['tokens_per_turn']}-token turns): rollout.py "
              f"{g['ours_tok_s']:,.0f} tok/s, model.generate {g['generate_tok_s']:,.0f} tok/s: {g['ratio']:.2f}x; "
              f"the same tokens both ways: {'yes' if g['same_tokens'] else 'NO'}")
    if s := phases.get("step"):
        print(f"step ({s['questions']} questions): rollout {s['rollout_s']:.1f} s, log-probs {s['logprob_s']:.1f} s, "
              f"update {s['update_s']:.1f} s, in all {s['step_s']:.1f} s; peak {s['peak_gb']:.2f} GB; sampled "
              f"{s['sampled_tokens']} of {s['forced_tokens']} forced tokens; reward {s['reward']:.2f}; the step changed "
              f"{s['changed_lora']} LoRA tensors and {s['changed_frozen']} others; pi_old drift (the sampler's log-probs "
              f"against the trainer's pass) mean {s['logp_drift']:.2e}, max {s['logp_drift_max']:.2e}")
    if m := phases.get("merged"):
        print(f"merged ({m['questions']} questions, the plan's chunk for --rollout-weights merged): copy made in "
              f"{m['copy_s']:.1f} s, rollout {m['rollout_s']:.1f} s ({m['ms_per_decode_step']:.1f} ms a decode step), "
              f"{m['tok_s']:,.0f} tok/s with the copy's making; peak {m['peak_gb']:.2f} GB")
    if run := phases.get("run"):
        m = phases.get("merged")
        compare = (f"; merged: {m['ms_per_decode_step']:.1f} ms a decode step in chunks of {m['questions']}" if m else "")
        print(f"the default run's step ({run['questions']} questions, {run['rollout_calls']} rollout calls, "
              f"{run['ms_per_decode_step']:.1f} ms a decode step{compare}): ~{run['step_s']:.0f} s; "
              f"~{run['steps_in_3h']:.0f} GRPO steps in 3 h")
        print(f"targets: peak memory {s['peak_gb']:.2f} GB (< {GPU_TARGETS['peak_gb']}): "
              f"{'met' if s['peak_gb'] < GPU_TARGETS['peak_gb'] else 'NOT met'}; steps in 3 h {run['steps_in_3h']:.0f} "
              f"(>= {GPU_TARGETS['steps_in_3h']}): {'met' if run['steps_in_3h'] >= GPU_TARGETS['steps_in_3h'] else 'NOT met'}")
    for failure in r["out_of_memory"]:
        print(f"OUT OF MEMORY in {failure['phase']} ({failure['sizes']}) at {failure['where'] or '?'}, the "
              f"allocator's peak {failure['peak_gb']:.2f} GB: {failure['error']}")
    if r.get("profile"):
        print(f"\n{r['profile']}")


def bench_plan(args) -> list:
    """The memory plan of Qwen2.5-3B at searchr1's defaults (arithmetic, no model), for each card size;
    the prompt as long as Search-R1's prompt of a 20-word question in Qwen2.5's chat template."""
    cfg = searchr1.Config(algo=args.algo, rollout_weights=args.rollout_weights)
    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    prompt = len(build_prompt(" ".join(["word"] * 20), tokenizer, chat=True))
    plans = []
    for gb in args.gpu_memory_gb:
        budget = policy.memory_plan(cfg, plan.Shape.of(QWEN25_3B), gb, 2, prompt)  # NF4 + bfloat16
        print(f"Qwen2.5-3B, NF4 + LoRA r{cfg.lora_r}, bfloat16, {args.algo.upper()} {cfg.batch_size} x "
              f"{cfg.samples_per_question}, a {prompt}-token prompt; chosen: --rollout-batch-size "
              f"{budget.rollout_batch_size} --micro-batch-size {budget.micro_batch_size}")
        print(budget.table())
        plans.append(budget)
    return plans


def bench_tiny(args) -> dict:
    """A tiny task with its warm-up's shares changed (the design findings of docs/tiny.md), trained with
    the TINY presets as `python searchr1.py --model TASK` trains it."""
    shares = {key: getattr(args, key) for key in ("skill_share", "search_share") if getattr(args, key) is not None}
    task = dataclasses.replace(tiny.TASKS[args.task], seed=args.seed, **shares)
    cfg = dataclasses.replace(searchr1.Config(), **searchr1.TINY, model=args.task, seed=args.seed,
                              out_dir=args.out_dir)
    return searchr1.run_tiny(cfg, task)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    retriever = commands.add_parser("retriever", help="BM25 engine: build time, peak RSS, queries/s")
    retriever.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                           help="corpus sizes, in passages")
    retriever.add_argument("--queries", type=int, default=256, help="queries a batch")
    retriever.add_argument("--cap-s", type=float, default=600,
                           help="seconds an engine may run at one size before it is stopped")
    retriever.add_argument("--seed", type=int, default=0)
    retriever.add_argument("--workdir", default=None,
                           help="folder for the temporary corpora and indexes (default: the system's)")
    retriever.set_defaults(run=bench_retriever)

    rollout_parser = commands.add_parser("rollout", help="rollout.py vs model.generate re-run each turn: tokens/s")
    rollout_parser.add_argument("--trajectories", type=int, default=64, help="trajectories in the batch")
    rollout_parser.add_argument("--turns", type=int, default=3, help="turns sampled; an observation follows all but the last")
    rollout_parser.add_argument("--tokens-per-turn", type=int, default=100, help="per-turn budget (and the equal length)")
    rollout_parser.add_argument("--obs-tokens", type=int, default=300, help="tokens of each observation")
    rollout_parser.add_argument("--prompt-tokens", type=int, default=100, help="tokens of each prompt")
    rollout_parser.add_argument("--lengths", choices=["equal", "varied", "both"], default="both",
                                help="equal: every turn runs to the budget; varied: seeded lengths in [budget/10, budget]")
    rollout_parser.add_argument("--hidden", type=int, default=256, help="random Qwen2: hidden size")
    rollout_parser.add_argument("--layers", type=int, default=4, help="random Qwen2: layers")
    rollout_parser.add_argument("--vocab", type=int, default=4096, help="random Qwen2: vocabulary (ids of the Qwen tokenizer)")
    rollout_parser.add_argument("--repeats", type=int, default=1, help="timed runs of each way; the fastest counts")
    rollout_parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    rollout_parser.add_argument("--seed", type=int, default=0)
    rollout_parser.add_argument("--profile", action="store_true",
                                help="also time one more rollout.py run by where its time goes: the model's forward "
                                     "calls, or everything else")
    rollout_parser.add_argument("--tokenizer", default=str(QWEN_TOKENIZER),
                                help="a tokenizer folder or hub id (default: the project's data/qwen2.5-tokenizer)")
    rollout_parser.set_defaults(run=bench_rollout)

    serve = commands.add_parser("serve", help="queries/s over HTTP (searchr1.py serve) vs in-process")
    serve.add_argument("--passages", type=int, default=100_000, help="synthetic corpus size")
    serve.add_argument("--batch", type=int, default=256, help="queries a request (one rollout turn)")
    serve.add_argument("--clients", type=int, default=4, help="concurrent clients (and in-process threads)")
    serve.add_argument("--calls", type=int, default=16, help="batches searched per path and round")
    serve.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is shown")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--workdir", default=None, help="folder for the temporary corpus and index")
    serve.set_defaults(run=bench_serve)

    plan_parser = commands.add_parser("plan", help="the memory plan of Qwen2.5-3B at the defaults, by arithmetic")
    plan_parser.add_argument("--gpu-memory-gb", type=float, nargs="+", default=[24, 16], help="card sizes to plan for")
    plan_parser.add_argument("--algo", default="grpo", choices=("grpo", "ppo"))
    plan_parser.add_argument("--rollout-weights", default="adapter", choices=("adapter", "merged"),
                             help="what the rollout samples from (searchr1's --rollout-weights)")
    plan_parser.set_defaults(run=bench_plan)

    gpu = commands.add_parser("gpu", help="Qwen2.5-3B in 4-bit + LoRA under a 24 GB cap: rollout tokens/s, "
                                          "a GRPO step by phase, peak memory, the merged copy, steps in 3 hours")
    gpu.add_argument("--tiny", action="store_true",
                     help="the same code on the CPU: a tiny Qwen2, small batch and lengths (seconds)")
    gpu.add_argument("--phases", nargs="+", choices=GPU_PHASES, default=list(GPU_PHASES),
                     help="what to measure (default: all): generate (rollout.py vs model.generate on a small chunk), "
                          "step (one train_step on one rollout chunk), merged (a rollout from the merged copy)")
    gpu.add_argument("--tokens-per-turn", type=int, default=None,
                     help=f"tokens forced in each of the 3 turns, = the per-turn budget (default: "
                          f"{GPU_SIZES['tokens_per_turn']}; --tiny: {GPU_TINY_SIZES['tokens_per_turn']})")
    gpu.add_argument("--passage-tokens", type=int, default=None,
                     help=f"tokens of each of the 3 passages a search returns (default: {GPU_SIZES['passage_tokens']}; "
                          f"--tiny: {GPU_TINY_SIZES['passage_tokens']})")
    gpu.add_argument("--compare-questions", type=int, default=None,
                     help="questions of the generate comparison (default: 1)")
    gpu.add_argument("--compare-tokens", type=int, default=None,
                     help=f"tokens a turn in the generate comparison (default: {GPU_SIZES['compare_tokens']}; "
                          f"--tiny: {GPU_TINY_SIZES['compare_tokens']})")
    gpu.add_argument("--group-size", type=int, default=None,
                     help=f"samples per question (default: searchr1's Config; --tiny: {GPU_TINY_SIZES['group_size']})")
    gpu.add_argument("--micro-batch-size", type=int, default=None,
                     help=f"default: the memory plan's; --tiny: {GPU_TINY_SIZES['micro_batch_size']}")
    gpu.add_argument("--rollout-batch-size", type=int, default=None,
                     help=f"questions a rollout call and a bench step (default: the memory plan's; --tiny: "
                          f"{GPU_TINY_SIZES['rollout_batch_size']})")
    gpu.add_argument("--memory-cap-gb", type=float, default=24, help="usable GPU memory in GiB, a consumer card's")
    gpu.add_argument("--profile", action="store_true",
                     help="run one more step under torch.profiler and print the ops that take the most time")
    gpu.add_argument("--profile-rows", type=int, default=25, help="ops the profile shows")
    gpu.add_argument("--threads", type=int, default=None, help="torch CPU threads with --tiny (default: 1)")
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--tokenizer", default=str(QWEN_TOKENIZER),
                     help="a tokenizer folder or hub id (default: the project's data/qwen2.5-tokenizer)")
    gpu.add_argument("--workdir", default=None, help="folder for the random checkpoint (6 GB for 3B)")
    gpu.add_argument("--json", default="", help="also write the results to this JSON file, after every phase")
    gpu.set_defaults(run=bench_gpu)

    tiny_parser = commands.add_parser("tiny", help="a tiny task with other warm-up shares (docs/tiny.md's findings)")
    tiny_parser.add_argument("--task", default="tiny-multihop", choices=sorted(tiny.TASKS))
    tiny_parser.add_argument("--skill-share", type=float, default=None,
                             help="trajectories making every lookup in the warm-up's first steps (default: the task's)")
    tiny_parser.add_argument("--search-share", type=float, default=None,
                             help="... and afterwards (default: the task's)")
    tiny_parser.add_argument("--seed", type=int, default=0)
    tiny_parser.add_argument("--out-dir", required=True, help="the run folder")
    tiny_parser.set_defaults(run=bench_tiny)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
