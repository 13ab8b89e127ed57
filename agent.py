"""The agent outside the update: what it searches, a trained adapter put on its base, and the greedy
evaluation that scores it.

Read by searchr1.py's train (its search and its held-out evaluation) and by commands.py (eval, ask,
export, serve); a first read may skip it.

    make_search   the search callable the rollout sees: in-process BM25 over --corpus (wiki-18 from
                  the hub when empty), or a Search-R1 retrieval server (--search-url)
    evaluate      greedy rollouts of questions, batched: one eval.prediction row each
    load_agent    policy.load_policy with a trained adapter put in (a checkpoint or a run folder)
    tiny_agent    `--model tiny` outside training: the run's own warm-up model and knowledge base
"""
import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

import rollout
import tiny
from cli import UsageError
from eval import prediction
from policy import load_policy, uses_chat_template
from retriever import BM25Index, format_passages
from rollout import build_prompt
from runs import checkpoint_folder, load_adapter
from search_api import RemoteIndex

WIKI18 = ("PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz")  # hub dataset, file (docs/reference.md)


def open_index(cfg) -> BM25Index:
    """The BM25 index of cfg.corpus (wiki-18 from the hub when empty), built on first use."""
    corpus = cfg.corpus
    if not corpus:
        from huggingface_hub import hf_hub_download
        corpus = hf_hub_download(WIKI18[0], WIKI18[1], repo_type="dataset")
    return BM25Index.open(corpus, index_dir=cfg.index_dir or None)


def make_search(cfg):
    """The search callable the rollout sees: queries -> formatted top-k passages, one per query."""
    index = RemoteIndex(cfg.search_url) if cfg.search_url else open_index(cfg)
    return lambda queries: [format_passages(hits) for hits in index.search(queries, k=cfg.topk)]


def evaluate(model, tokenizer, questions, search, cfg, desc: str = "eval", prompts=None) -> list[dict]:
    """Greedy rollouts, batched: one eval.prediction row per question (eval.summarize averages them).

    prompts(batch of questions) -> their prompt token ids; None = Search-R1's prompt (rollout.build_prompt).
    """
    model.eval()
    chat = uses_chat_template(cfg, tokenizer)
    prompts = prompts or (lambda batch: [build_prompt(q["question"], tokenizer, chat) for q in batch])
    greedy = cfg.rollout_config(greedy=True)
    predictions = []
    for i in tqdm(range(0, len(questions), cfg.eval_batch_size), desc=desc, leave=False):
        batch = questions[i: i + cfg.eval_batch_size]
        for t, q in zip(rollout.rollout(model, tokenizer, prompts(batch), search, greedy), batch):
            predictions.append(prediction(q, t.text, t.queries, t.answered))
    return predictions


def load_agent(cfg, adapter: str, device):
    """load_policy, with a trained adapter put in: a checkpoint folder, or a run folder's latest
    checkpoint."""
    if not adapter:
        return load_policy(cfg, device)  # a fresh adapter adds exactly 0: the model as it is
    folder, _ = checkpoint_folder(adapter)
    lora = json.loads((folder / "adapter_config.json").read_text())  # the shapes it was trained with
    cfg = dataclasses.replace(cfg, lora_r=lora["r"], lora_alpha=lora["lora_alpha"],
                              lora_targets=lora["target_modules"])
    tokenizer, model = load_policy(cfg, device)
    load_adapter(model, folder)
    return tokenizer, model


def tiny_agent(cfg, adapter: str):
    """`--model tiny` (or tiny-multihop) outside training: the base is the run's warm-up model,
    searching the run's own knowledge base, both read from the run's config.json (adapter: a run
    folder or one of its checkpoints)."""
    if cfg.model not in tiny.TASKS:
        return cfg
    folder = Path(adapter)
    run = next((f for f in (folder, folder.parent.parent) if adapter and (f / "config.json").is_file()), None)
    if run is None:
        raise UsageError(f"--model {cfg.model}: give --adapter with the run folder of `python searchr1.py "
                         f"--model {cfg.model}` (e.g. runs/{cfg.model}) or one of its checkpoints")
    saved = json.loads((run / "config.json").read_text())
    return dataclasses.replace(cfg, model=saved["model"], corpus=cfg.corpus or saved["corpus"],
                               index_dir=cfg.index_dir or saved["index_dir"])
