"""The commands beside training: eval, ask, export, plot, serve, and corpus, which makes a corpus of
one's own documents (`python searchr1.py COMMAND --help`). Each command's settings live in its entry of COMMANDS: the Config fields it reads (its
flags), its own defaults for them, its own arguments.

Read by searchr1.py's main, which adds `train`; a first read may skip it.
"""
import argparse
import dataclasses
import os
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import corpus
import rollout
from agent import evaluate, load_agent, make_search, open_index, tiny_agent
from cli import Command, UsageError
from eval import BENCHMARKS, METHODS, baseline_prompt, em_table, extract_answer, load_qa, summarize
from policy import pick_device, resolve_model, uses_chat_template
from rollout import build_prompt, encode_prompt
from runs import checkpoint_folder, plot_runs, save_predictions, saved_predictions, write_atomic
from search_api import serve

def method_prompts(method: str, tokenizer, chat: bool, search):
    """evaluate's prompts for a method: None (Search-R1's prompt) for search-r1, else the baseline's."""
    if method == "search-r1":
        return None
    def prompts(batch):  # RAG: the top-k passages of the question itself, retrieved once
        passages = search([q["question"] for q in batch]) if method == "rag" else [""] * len(batch)
        return [encode_prompt(baseline_prompt(method, q["question"], p), tokenizer, chat)
                for q, p in zip(batch, passages)]
    return prompts


# what makes a saved (method, dataset) result reusable by a resumed `eval` (and the checkpoint)
EVAL_SETTINGS = ("model", "chat", "load_4bit", "corpus", "search_url", "topk", "max_turns", "max_new_tokens",
                 "max_obs_tokens", "seed")


def command_eval(cfg, args) -> None:
    """Every (method, dataset) cell: load saved predictions made with the same settings, or evaluate."""
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: must be at least 0 (0 = every question)")
    cfg = tiny_agent(cfg, args.adapter)
    methods, sources = args.methods.split(","), args.datasets.split(",")
    if unknown := sorted(set(methods) - set(METHODS)):
        raise UsageError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    names = [Path(s).stem if s.endswith((".jsonl", ".json")) else s for s in sources]  # table columns
    if len(set(names)) < len(names):
        raise UsageError(f"--datasets: two datasets share a name ({', '.join(names)}); rename a file")
    out = Path(cfg.out_dir or (Path(args.adapter) / "eval" if args.adapter else f"runs/eval/{Path(cfg.model).name}"))
    taken, said = chosen_checkpoint(args)  # once: a training run's latest moves on
    settings = {key: getattr(cfg, key) for key in EVAL_SETTINGS} | {"adapter": taken, "limit": args.limit}
    cells, todo = {}, []  # (method, dataset name) -> predictions; cells still to evaluate
    for source, name in zip(sources, names):
        questions = load_qa(source)
        if 0 < args.limit < len(questions):
            questions = random.Random(cfg.seed).sample(questions, args.limit)
        for method in methods:
            cell = {**settings, "method": method, "dataset": source}
            cells[method, name] = saved_predictions(out / method / f"{name}.json", cell, questions)
            if cells[method, name] is None:
                todo.append((method, name, questions, cell))
    if todo:  # nothing is loaded when every cell was saved by an earlier run
        tokenizer, model = trained_agent(cfg, taken, said, pick_device(cfg))
        search = make_search(cfg) if any(method != "direct" for method, *_ in todo) else None
    for method, name, questions, cell in todo:
        # the baselines answer in one turn that runs no search: max_turns 0
        run_cfg = cfg if method == "search-r1" else dataclasses.replace(cfg, max_turns=0)
        cells[method, name] = evaluate(model, tokenizer, questions, search, run_cfg, desc=f"{method} {name}",
                                       prompts=method_prompts(method, tokenizer, uses_chat_template(cfg, tokenizer),
                                                              search))
        save_predictions(out / method / f"{name}.json", cell, cells[method, name])
        tqdm.write(f"{method} on {name}: EM {summarize(cells[method, name])['em']:.3f}")
    sizes = ", ".join(f"{name} {len(cells[methods[0], name])}" for name in names)
    table = (em_table({key: summarize(p)["em"] for key, p in cells.items()}, methods, names)
             + f"\nExact match, greedy. Model {cfg.model}{' + adapter ' + args.adapter if args.adapter else ''}; "
               f"questions per dataset: {sizes}.\n")
    write_atomic(out / "results.md", table)
    print(table + f"\nsaved: {out / 'results.md'}, predictions in {out}/<method>/<dataset>.json")


def command_ask(cfg, args) -> None:
    """Greedy Search-R1 rollouts of one question at a time, printed as they are sampled."""
    cfg = tiny_agent(cfg, args.adapter)
    tokenizer, model = trained_agent(cfg, *chosen_checkpoint(args), pick_device(cfg))
    search, chat = make_search(cfg), uses_chat_template(cfg, tokenizer)

    def search_and_show(queries):
        results = search(queries)
        for passages in results:
            titles = re.findall(r"^Doc \d+\(Title: (.*?)\) ", passages, flags=re.MULTILINE)
            print(f"\n[found: {'; '.join(titles) or 'nothing'}]", flush=True)
        return results

    turn_ids, shown = [], [""]
    def show_token(logits, rows, turn, step):
        """A logits hook that changes nothing: greedy decoding samples this argmax; print it now."""
        if step == 0:
            turn_ids.clear()
            shown[0] = ""
        turn_ids.append(int(logits[0].argmax()))
        text = tokenizer.decode(turn_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # else: wait for the rest of a multi-byte character
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text
        return logits

    def answer(question: str):
        prompt = build_prompt(question, tokenizer, chat)
        (t,) = rollout.rollout(model, tokenizer, [prompt], search_and_show, cfg.rollout_config(greedy=True),
                       logits_hook=show_token)
        print(f"\nanswer: {extract_answer(t.text) or '(none)'}  ({t.n_searches} searches)\n", flush=True)

    if args.question:
        return answer(args.question)
    while True:  # one question a line, until an empty line or the end of the input
        try:
            question = input("question> ").strip()
        except EOFError:
            break
        if not question:
            break
        answer(question)


def command_export(cfg, args) -> None:
    """The base model with the adapter merged into its weights, saved as a plain Hugging Face model."""
    if not args.adapter or not args.out:
        raise UsageError("export needs --adapter (a run or checkpoint folder) and --out (a new folder)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder is not empty; give a new one")
    # a 16-bit merge needs 16-bit base weights: load them unquantized (on a GPU when --device finds one)
    cfg = dataclasses.replace(tiny_agent(cfg, args.adapter), load_4bit=False, gradient_checkpointing=False)
    tokenizer, model = trained_agent(cfg, *chosen_checkpoint(args), pick_device(cfg))
    merged = model.merge_and_unload()                   # W <- W + (alpha / r) B A, the adapter gone
    tmp = out.with_name(out.name + ".tmp")              # written whole, then renamed into place
    merged.to(getattr(torch, args.dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: {resolve_model(cfg.model)} with {args.adapter} merged, {args.dtype}; "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")


def command_plot(cfg, args) -> None:
    png = Path(args.out) if args.out else Path(args.runs[0]) / "metrics.png"
    print(f"wrote {plot_runs([Path(run) for run in args.runs], png)}")


def command_serve(cfg, args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be 0 (any free port) to 65535")
    serve(open_index(cfg), args.host, args.port, default_topk=cfg.topk)


def command_corpus(cfg, args) -> None:
    """Files and folders of one's own -> a Search-R1 corpus for --corpus (corpus.py), and its summary."""
    if args.words < 1:
        raise UsageError(f"--words {args.words}: must be at least 1")
    print(corpus.build_corpus(args.paths, Path(args.out), strict=args.strict, words=args.words).render())


def chosen_checkpoint(args) -> tuple[str, str]:
    """--adapter and --checkpoint: the checkpoint folder ("" = no adapter) and a line saying which."""
    if not args.adapter:
        return "", ""
    folder, said = checkpoint_folder(args.adapter, args.checkpoint)
    return str(folder), said


def trained_agent(cfg, folder: str, said: str, device):
    """load_agent with the chosen checkpoint folder, saying on stderr which it is."""
    if said:
        print(said, file=sys.stderr)
    return load_agent(cfg, folder, device)


def adapter_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--adapter", default="", help="a LoRA adapter from training: a checkpoint folder "
                        "(<run>/checkpoints/step-N) or a run folder (its checkpoint of --checkpoint); --model "
                        "is its base (default: none, the model as it is)")
    parser.add_argument("--checkpoint", default="latest", choices=("latest", "best"),
                        help="with a run folder as --adapter: its latest checkpoint, or the one with the best "
                             "held-out EM (default: latest)")


def eval_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("--datasets", default=",".join(BENCHMARKS),
                        help="comma-separated benchmark names (hub, the paper's split) or FlashRAG JSONL files "
                             "(default: the paper's seven)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all three)")
    parser.add_argument("--limit", type=int, default=0,
                        help="questions per dataset, a sample seeded by --seed; 0 = all (default: 0)")


def ask_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("question", nargs="?", default="",
                        help="the question; none = read questions from standard input until an empty line")


def export_arguments(parser: argparse.ArgumentParser):
    adapter_argument(parser)
    parser.add_argument("--out", default="", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="the merged weights' type (default: bfloat16)")


def plot_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl), overlaid in one figure")
    parser.add_argument("--out", default="", help="the PNG to write (default: <first run>/metrics.png)")


def serve_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 = every interface, for trusted networks only: "
                             "there is no authentication (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one (default: 8000)")


# The Config fields a command reads, and so shows in its --help (train reads them all)
AGENT = ("model", "chat", "load_4bit", "corpus", "index_dir", "search_url", "topk", "max_turns",
         "max_new_tokens", "max_obs_tokens", "device", "dtype")
# The reference evaluates with 4 search turns (scripts/nq_hotpotqa/evaluate.sh); it trains with 2.
EVAL_TURNS = {"max_turns": 4}
COMMANDS = {
    "serve": Command(command_serve, "Serve the BM25 index of --corpus over HTTP with Search-R1's retrieval API "
                     "(POST /retrieve); --topk is the default top-k.", ("corpus", "index_dir", "topk"),
                     arguments=serve_arguments),
    "eval": Command(command_eval, "Exact match of direct answers, RAG and Search-R1 on QA benchmarks, greedy: the "
                    "paper's table in --out-dir/results.md, every prediction in --out-dir/<method>/<dataset>.json. "
                    "A rerun reuses finished cells.", AGENT + ("out_dir", "eval_batch_size", "seed"), EVAL_TURNS,
                    eval_arguments),
    "plot": Command(command_plot, "Draw runs' metrics.jsonl (reward, held-out EM, searches, lengths, KL, clip "
                    "fraction, ...) against the step, in one PNG.", (), arguments=plot_arguments),
    "export": Command(command_export, "Merge a trained adapter into its base model and save a plain Hugging Face "
                      "model folder (with the tokenizer).", ("model", "device"), arguments=export_arguments),
    "ask": Command(command_ask, "Ask the agent questions; prints its reasoning, searches, the titles found and its "
                   "answer as they come.", AGENT, EVAL_TURNS, ask_arguments),
    "corpus": Command(command_corpus, "Make a Search-R1 corpus (JSONL, for --corpus) of files and folders of your "
                      "own: text, Markdown, HTML, and PDF with pypdf installed. Prints what it read and skipped.",
                      (), arguments=corpus.add_arguments),
}
