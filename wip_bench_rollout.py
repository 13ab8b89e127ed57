"""`python bench.py rollout`: rollout.py against the naive way, same model, same tokens.

The naive way is what the reference implementation's engine does: every turn, generate again over
each whole history (prompt, earlier turns, observations), prefilling it from scratch, here with
Hugging Face's model.generate (it stops each row where the script ends, as an engine stops on the
stop string). rollout.py instead continues one KV cache, prefills only the new observation, drops
sequences that finished their turn from the batch and writes the cache in place.

Random weights write no stop tags, so what is sampled is forced by a script (rollout's logits hook,
a LogitsProcessor for generate): each turn is `<search>` + filler + `</search>`, of the length the
script sets (the last turn's search is not run, as SPEC section 3 says). `--lengths equal` runs every turn
to the per-turn budget; `--lengths varied` draws each turn's length from a seeded schedule, as real
stop strings make them. Both ways must produce the very same tokens; the table says whether they did.
The pieces (forced_script, script_hook, generate_rollout) are meant for other benchmarks too.
"""
import argparse
import time
from pathlib import Path

import torch
from transformers import (AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList, Qwen2Config,
                          Qwen2ForCausalLM, StoppingCriteria, StoppingCriteriaList)

from rollout import INVALID_ACTION, RolloutConfig, observation, parse_action, rollout

QWEN_TOKENIZER = Path(__file__).parent.parent / "shared" / "data" / "qwen2.5-tokenizer"


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
        forced = script[rows, turn, step].clamp(min=0)  # (A,)
        return torch.full_like(logits, float("-inf")).scatter_(1, forced[:, None], 0.0)
    return hook


class _Force(LogitsProcessor):
    """The same script for model.generate: batch row i is trajectory rows[i], `start` is its prompt width."""

    def __init__(self, script, rows, turn, start):
        self.hook, self.rows, self.turn, self.start = script_hook(script), rows, turn, start
        self.last = script.shape[2] - 1  # rows that are done keep being computed by generate: clamp their step

    def __call__(self, input_ids, scores):
        return self.hook(scores, self.rows, self.turn, min(input_ids.shape[1] - self.start, self.last))


class _StopAt(StoppingCriteria):
    """Row i of the batch is done once it has sampled lengths[i] tokens (where its stop string ends)."""

    def __init__(self, lengths, start):
        self.lengths, self.start = lengths, start

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.lengths


def generate_rollout(model, tokenizer, prompts, search, cfg: RolloutConfig, script: torch.Tensor) -> list[list[int]]:
    """The naive multi-turn rollout: per turn, model.generate over every whole history; returns response ids."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    histories = [list(p) for p in prompts for _ in range(cfg.n_samples)]
    responses = [[] for _ in histories]
    going = list(range(len(histories)))
    script = script.to(device)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    for turn in range(cfg.max_turns + 1):
        width = max(len(histories[r]) for r in going)
        ids = torch.tensor([[pad] * (width - len(histories[r])) + histories[r] for r in going], device=device)
        mask = torch.tensor([[0] * (width - len(histories[r])) + [1] * len(histories[r]) for r in going], device=device)
        rows = torch.tensor(going, device=device)
        lengths = (script[rows, turn] >= 0).sum(1)  # (A,) tokens each row samples this turn
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             logits_processor=LogitsProcessorList([_Force(script, rows, turn, width)]),
                             stopping_criteria=StoppingCriteriaList([_StopAt(lengths, width)]))
        nxt, queries, obs = [], [], {}
        for i, r in enumerate(going):
            sampled = out[i, width : width + int(lengths[i])].tolist()
            histories[r] += sampled
            responses[r] += sampled
            kind, content = parse_action(tokenizer.decode(sampled))
            if turn < cfg.max_turns and kind != "answer":
                nxt.append(r)
                if kind == "search":
                    queries.append((r, content))
                else:
                    obs[r] = INVALID_ACTION
        for (r, _), passages in zip(queries, search([q for _, q in queries]) if queries else []):
            obs[r] = observation(passages)
        for r in nxt:
            tokens = tokenizer(obs[r], add_special_tokens=False)["input_ids"][: cfg.max_obs_tokens]
            histories[r] += tokens
            responses[r] += tokens
        going = nxt
        if not going:
            break
    return responses


class _ModuloEmbedding(torch.nn.Module):
    """Observation tags and padding are Qwen tokenizer ids beyond the small model's vocabulary: they read
    embedding row id % vocab (what is computed, and so the cost, is unchanged)."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, ids):
        return self.embedding(ids % self.embedding.num_embeddings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trajectories", type=int, default=64, help="trajectories in the batch")
    parser.add_argument("--turns", type=int, default=3, help="turns sampled; an observation follows all but the last")
    parser.add_argument("--tokens-per-turn", type=int, default=100, help="per-turn budget (and the equal length)")
    parser.add_argument("--obs-tokens", type=int, default=300, help="tokens of each observation")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="tokens of each prompt")
    parser.add_argument("--lengths", choices=["equal", "varied", "both"], default="both",
                        help="equal: every turn runs to the budget; varied: seeded lengths in [budget/10, budget]")
    parser.add_argument("--hidden", type=int, default=256, help="random Qwen2: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random Qwen2: layers")
    parser.add_argument("--vocab", type=int, default=4096, help="random Qwen2: vocabulary (ids of the Qwen tokenizer)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each way; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=str(QWEN_TOKENIZER) if QWEN_TOKENIZER.exists() else "Qwen/Qwen2.5-3B")


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
                        temperature=1.0, n_samples=1)
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
        naive = lambda n=args.trajectories: generate_rollout(model, tokenizer, prompts[:n], search, cfg,  # noqa: E731
                                                             script[:n])
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
                    same = [t.response_ids for t in trajs] == out
        sampled = sum(sum(t.loss_mask) for t in trajs)
        (ours_s, ours_cpu), (naive_s, naive_cpu) = best["ours"], best["naive"]
        results.append({"lengths": mode, "sampled_tokens": sampled, "ours_s": ours_s, "naive_s": naive_s,
                        "ours_tok_s": sampled / ours_s, "naive_tok_s": sampled / naive_s, "speedup": naive_s / ours_s,
                        "cpu_speedup": naive_cpu / ours_cpu, "same_tokens": same})
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
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    bench_rollout(parser.parse_args())
