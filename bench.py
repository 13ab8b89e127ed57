"""Benchmarks: `python bench.py <command>`, one function per command (`bench_<command>`).

retriever: index build time, peak memory and queries/s of searchr1's BM25 (tantivy) beside
rank-bm25's BM25Okapi, on a synthetic corpus written in Search-R1's JSONL format and read through
the real path (`BM25Index.open`). Each engine runs in a fresh child process, which reports its own
peak RSS, so no engine's memory (or the corpus generator's) counts against another. queries/s
counts the whole call: tokenizing, ranking and returning the top-3 passages' text.

serve: queries/s of the same BM25 index searched in-process and through `python searchr1.py serve`
(Search-R1's HTTP API, search_api.py), with 1 and with several concurrent clients, in interleaved
rounds so that load from other programs weighs on every path alike; then where an HTTP batch's
extra time goes (encoding and decoding the JSON).
"""
import argparse
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
from pathlib import Path

import numpy as np

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
                              cwd=Path(__file__).resolve().parent, stdout=subprocess.PIPE, text=True)
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
    print(f"CPU time of one batch (ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in cpu_ms.items())
          + f" ({len(body) / 1e3:,.0f} kB of JSON)")
    print(f"1 client, wall clock: HTTP adds {http_ms - local_ms:.1f} ms a batch; JSON's CPU time is {json_ms:.1f} "
          f"of it; sockets, thread wake-ups and waiting for a core the other {http_ms - local_ms - json_ms:.1f}")
    print(f"\ntarget: {SERVE_TARGET}")
    for what, ratio in ratios.items():
        print(f"  {what}: HTTP / in-process = {ratio:.2f}: {'met' if ratio >= 0.8 else 'NOT met'}")


def main():
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

    serve = commands.add_parser("serve", help="queries/s over HTTP (searchr1.py serve) vs in-process")
    serve.add_argument("--passages", type=int, default=100_000, help="synthetic corpus size")
    serve.add_argument("--batch", type=int, default=256, help="queries a request (one rollout turn)")
    serve.add_argument("--clients", type=int, default=4, help="concurrent clients (and in-process threads)")
    serve.add_argument("--calls", type=int, default=16, help="batches searched per path and round")
    serve.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is shown")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--workdir", default=None, help="folder for the temporary corpus and index")
    serve.set_defaults(run=bench_serve)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
