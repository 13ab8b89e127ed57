"""The run folder: what a training run leaves on disk, and how it is continued.

Read by searchr1.py's train, by agent.py and commands.py (which read runs) and tiny.py; a first read
may skip it.

    <run>/config.json        the settings, written when the run starts
    <run>/metrics.jsonl      a row a step: the step's means (searchr1.train_step), its health signals
                             and warnings (health.py) and evaluations
    <run>/samples.jsonl      a few trajectories a step, written out whole, and those that tripped a
                             health check (sample_rows)
    <run>/eval/step-N.json   every prediction of each evaluation
    <run>/checkpoints/       step-N/ (the LoRA adapter in peft's format, PPO's critic and value head,
                             the optimizer, scheduler and loss scaler), latest.json naming the newest
                             and best.json the one with the best held-out EM (kept whatever
                             --keep-checkpoints says)
    <run>/tensorboard/, <run>/wandb/   with --report-to: every number of every step (Reporters)

The settings, checkpoints and evaluations are written whole or not at all (a temporary file, then a
rename), so a killed run never leaves half a checkpoint; the logs grow a line a step, and a line a
kill cut short is dropped when the run resumes. A folder that holds a run is continued (--resume, the same settings) or
started over (--overwrite), never overwritten by accident. Nothing loaded runs code: the adapter is
safetensors, the trainer state a torch.load with weights_only.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch
from tqdm import tqdm

from cli import NothingToDo, UsageError, flag
from eval import extract_answer, summarize
from ppo import CRITIC

def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, then rename it: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_predictions(path: Path, settings: dict, predictions: list[dict]) -> None:
    """One (method, dataset) cell: the settings that made it, its means, and every prediction."""
    cell = {"settings": settings, **summarize(predictions), "predictions": predictions}
    write_atomic(path, json.dumps(cell, indent=1, ensure_ascii=False) + "\n")


def saved_predictions(path: Path, settings: dict, questions: list[dict]) -> list[dict] | None:
    """The predictions saved at `path` when they were made with these settings on these questions."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or unreadable: evaluate again
        return None
    predictions = saved.get("predictions", [])
    same_questions = [p["id"] for p in predictions] == [q["id"] for q in questions]
    return predictions if saved.get("settings") == settings and same_questions else None


# What a run folder holds besides config.json; --overwrite deletes these (tiny's task/ stays).
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval", "metrics.png")
# Settings a resumed run may change: how long it runs, how often it saves and reports, and how the
# same work is cut for memory. Any other difference changes what the run computes.
RESUMABLE = {"steps", "resume", "overwrite", "out_dir", "save_every", "keep_checkpoints", "eval_every",
             "eval_batch_size", "rollout_batch_size", "micro_batch_size", "samples", "device", "index_dir",
             "search_url", "rollout_weights", "report_to"}


def check_run_folder(run: Path, cfg, derived: tuple = ()) -> None:
    """Before any work: a folder that holds a run is continued (--resume, same settings) or started
    over (--overwrite), never overwritten by accident. derived: settings not compared (tiny's paths)."""
    latest = run / "checkpoints" / "latest.json"
    if not cfg.resume:
        if not cfg.overwrite and any((run / name).exists() for name in RUN_FILES[:2]):
            raise UsageError(f"{run} holds a run already: continue it with --resume, or start it over with "
                             "--overwrite (which deletes its checkpoints and metrics)")
        return
    if not latest.is_file():
        raise UsageError(f"--resume: no checkpoint in {run} (looked for {latest})")
    saved = json.loads((run / "config.json").read_text())
    ignored = RESUMABLE | set(derived)
    differ = [f"{flag(k)} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
              if k not in ignored and k in saved and saved[k] != v]
    if differ:
        raise UsageError(f"--resume: settings differ from the run in {run}: {'; '.join(differ)} "
                         "(resume with the run's settings, or give a new --out-dir)")
    step = json.loads(latest.read_text())["step"]
    if cfg.steps <= step:
        raise NothingToDo(f"{run} is at step {step} of --steps {cfg.steps}: nothing to do "
                          f"(a larger --steps trains on)")


def start(run: Path, cfg) -> None:
    """Rank 0, after check_run_folder: the folder made (emptied first with --overwrite) and the settings
    written, or (--resume) the log rows after the last checkpoint forgotten, as the run redoes them."""
    if cfg.resume:
        step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = run / name
            kept = [r for r in rows(path) if r["step"] <= step]
            write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        return
    for name in RUN_FILES if cfg.overwrite else ():
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_atomic(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def rows(path: Path) -> list[dict]:
    """The rows of a JSONL log (metrics.jsonl, samples.jsonl); none when it does not exist yet. A run
    killed while it wrote leaves at most its last line unfinished: that line is left out."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if lines and not lines[-1].endswith("}"):
        lines.pop()
    return [json.loads(line) for line in lines]


def append(path: Path, rows: list[dict]) -> None:
    """Rows at the end of a JSONL log (metrics.jsonl, samples.jsonl)."""
    with path.open("a", encoding="utf-8") as log:
        log.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Ctrl-C once: the loop sees `stop` true, finishes its step, saves and exits; twice: exit now."""
    stop = []
    def on_interrupt(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        tqdm.write("interrupted: saving after this step (Ctrl-C again to quit without saving)")
    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def evaluates(cfg, step: int) -> bool:
    """Whether the run evaluates after step `step` (from 1): every eval_every steps, and the last."""
    return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps


def duration(seconds: float) -> str:
    """A time in the unit a reader wants for it: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def time_plan(stats: dict, cfg, start: int, questions: int) -> str:
    """What the rest of the run takes, from its first step: every step as long as that one, and each
    evaluation as long as its rollout calls (one per eval_batch_size questions), a call taken to
    cost what one of the step's rollout calls cost -- decoding is bound by the kernels launched a
    token, not by the rows in the batch."""
    calls = -(-questions // cfg.rollout_batch_size)
    evals = sum(evaluates(cfg, s) for s in range(start + 1, cfg.steps + 1))
    eval_s = -(-cfg.eval_size // cfg.eval_batch_size) * stats["rollout_s"] / calls
    left = (cfg.steps - start - 1) * stats["step_s"] + evals * eval_s
    return (f"time plan: a step takes {duration(stats['step_s'])} "
            f"(rollout {duration(stats['rollout_s'])} in {calls} call{'s' * (calls > 1)} of up to "
            f"{cfg.rollout_batch_size} questions, log-probs {duration(stats['logprob_s'])}, "
            f"update {duration(stats['update_s'])}), an evaluation ~{duration(eval_s)}: "
            f"~{duration(left)} more for the {cfg.steps - start - 1} steps and {evals} "
            f"evaluation{'s' * (evals != 1)} left")


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, keep: int = 0, scaler=None):
    """Atomic: write checkpoints/step-N.tmp, rename it, then repoint latest.json (os.replace).
    keep: how many of the newest checkpoints stay; 0 = all."""
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)                       # the LoRA adapter, in peft's format
    if CRITIC in model.peft_config:                  # PPO: the critic adapter went to tmp/critic/; its head
        from safetensors.torch import save_file
        save_file(model.value_head.state_dict(), tmp / "value_head.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                **({"scaler": scaler.state_dict()} if scaler else {})}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / "latest.json", json.dumps({"step": step, "path": final.name}))
    if keep:  # only the newest `keep` (names sort by step), and the best, whatever its age
        best = best_checkpoint(run)
        for old in sorted(root.glob("step-??????"))[:-keep]:
            if not best or old.name != best["path"]:
                shutil.rmtree(old, ignore_errors=True)


def mark_best(run: Path, step: int, eval_em: float) -> None:
    """best.json beside latest.json: the checkpoint of step `step`, whose held-out EM is the run's best."""
    write_atomic(run / "checkpoints" / "best.json",
                 json.dumps({"step": step, "path": f"step-{step:06d}", "eval_em": eval_em}))


def best_checkpoint(run: Path) -> dict | None:
    """{"step", "path", "eval_em"} of the run's best held-out EM so far, or None before any."""
    best = run / "checkpoints" / "best.json"
    return json.loads(best.read_text()) if best.is_file() else None


def load_adapter(model, folder: Path, adapter: str = "default"):
    """Put the LoRA weights saved in `folder` (peft's adapter_model.safetensors) into `model`'s
    adapter named `adapter` (the policy's, or PPO's critic)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"), adapter_name=adapter)
    missing = [key for key in result.missing_keys if "lora_" in key and f".{adapter}." in key]  # this adapter's
    if missing or result.unexpected_keys:
        raise UsageError(f"{folder}: the adapter does not fit this model ({len(missing)} LoRA weights "
                         f"missing, {len(result.unexpected_keys)} unexpected): was it trained on another base?")


def checkpoint_folder(adapter: str, which: str = "latest") -> tuple[Path, str]:
    """--adapter: a checkpoint folder as it is, or a run folder's latest or best checkpoint
    (--checkpoint); returns the folder and a line saying which it is."""
    folder, root = Path(adapter), Path(adapter) / "checkpoints"
    said = f"adapter: {folder}"
    if (root / "latest.json").is_file():
        best = best_checkpoint(folder)
        if which == "best" and not best:
            raise UsageError(f"--checkpoint best: {adapter} has no best.json yet (no evaluation has run)")
        picked = best if which == "best" else json.loads((root / "latest.json").read_text())
        folder = root / picked["path"]
        said = (f"adapter: {folder}, the run's {which}: step {picked['step']}"
                + (f", held-out EM {best['eval_em']:.3f} (its best)" if which == "best" else ""))
        if which == "latest" and best:
            said += f" (the best, EM {best['eval_em']:.3f}, is step {best['step']}: --checkpoint best)"
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json there; give a checkpoint folder "
                         "(<run>/checkpoints/step-N) or a run folder")
    return folder, said


def load_checkpoint(run: Path, model, optimizer, scheduler, scaler=None) -> int:
    """Restore adapter, optimizer and scheduler from the last checkpoint (check_run_folder has found
    it); returns its step."""
    ckpt = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    load_adapter(model, ckpt)
    if CRITIC in model.peft_config:  # PPO: the critic adapter (peft's subfolder) and the value head
        from safetensors.torch import load_file
        load_adapter(model, ckpt / CRITIC, CRITIC)
        model.value_head.load_state_dict(load_file(ckpt / "value_head.safetensors"))
    # weights_only: the unpickler accepts tensors and plain containers only, never code
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return state["step"]


def sample_rows(step: int, questions, trajectories, rewards, tokenizer, cfg,
                flagged: dict[int, list[str]] | None = None) -> list[dict]:
    """A seeded choice of cfg.samples trajectories, and those that tripped a health check (flagged:
    index -> the checks, health.flagged), written out whole: what the policy wrote, what the search
    engine returned (the `segments` alternate), its queries, answer and reward, and `flagged`."""
    flagged = flagged or {}
    seeded = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(trajectories)),
                                                               min(cfg.samples, len(trajectories)))
    rows = []
    for i in sorted(set(seeded) | set(flagged)):
        t, q = trajectories[i], questions[i // cfg.samples_per_question]
        segments, start = [], 0  # runs of equal loss_mask: 1 = written by the policy, 0 = inserted
        # (passages, or the invalid-action message: "search" for both)
        for end in range(1, len(t.loss_mask) + 1):
            if end == len(t.loss_mask) or t.loss_mask[end] != t.loss_mask[start]:
                by = "policy" if t.loss_mask[start] else "search"
                segments.append({"by": by, "text": tokenizer.decode(t.response_ids[start:end])})
                start = end
        rows.append({"step": step, "question": q["question"], "golden_answers": q["golden_answers"],
                     "segments": segments, "queries": t.queries, "answer": extract_answer(t.text),
                     "reward": rewards[i].item(), "seeded": i in seeded,
                     **({"flagged": flagged[i]} if i in flagged else {})})
    return rows


class Reporters:
    """--report-to: every step's numbers also to TensorBoard (event files in <run>/tensorboard) and
    to wandb (a run kept in <run>/wandb; WANDB_MODE=offline needs no network, `wandb sync` uploads it
    later). Neither is installed with searchr1: `pip install tensorboard` or `pip install wandb`."""

    def __init__(self, run: Path, cfg, start: int, master: bool = True):
        """start: the step the run starts after (a resumed run's checkpoint); the master alone reports."""
        self.tensorboard = self.wandb = None
        wanted = [name for name in cfg.report_to.split(",") if name] if master else []
        if "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError(f"--report-to tensorboard needs the tensorboard package: pip install "
                                 f"tensorboard ({e})") from None
            # a resumed run drops what it logged after its checkpoint, as metrics.jsonl does
            self.tensorboard = SummaryWriter(run / "tensorboard", purge_step=start + 1 if start else None)
        if "wandb" in wanted:
            try:
                import wandb
            except ImportError as e:
                raise UsageError(f"--report-to wandb needs the wandb package: pip install wandb ({e})") from None
            run_id = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:12]  # resumes continue it
            self.wandb = wandb.init(project="searchr1", name=run.name, id=run_id, resume="allow",
                                    dir=str(run), config=dataclasses.asdict(cfg),
                                    settings=wandb.Settings(console="off", silent=True))

    def log(self, row: dict) -> None:
        """The row's numbers (lists and text left out), at its step."""
        numbers = {key: value for key, value in row.items()
                   if isinstance(value, (int, float)) and key != "step"}
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(numbers, step=row["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


PANELS = [("reward", "training reward"), ("eval_em", "held-out EM (greedy)"),
          ("searches", "searches per trajectory"), ("response_len", "response tokens"),
          ("kl", "KL to the reference"), ("clip_frac", "clip fraction"), ("entropy", "entropy"),
          ("value_loss", "value loss (PPO)"),
          # run health (health.py): the reasoning's format, groups that teach nothing, loops
          ("format_ok", "format kept (share)"), ("no_signal_groups", "groups with no signal (share)"),
          ("broken_tags", "broken tags per trajectory"), ("repeated_4grams", "repeated 4-grams (share)")]


def plot_runs(runs: list[Path], png: Path) -> Path:
    """One figure of each run's metrics.jsonl against the step, a panel per quantity, runs overlaid."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    logs = {}
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise UsageError(f"{run}: no metrics.jsonl there (is it a run folder?)")
        algo = json.loads((run / "config.json").read_text())["algo"].upper() if (run / "config.json").is_file() else "?"
        logs[f"{run.name} ({algo})"] = rows(run / "metrics.jsonl")  # a live run's unfinished line left out
    panels = [(key, title) for key, title in PANELS if any(key in r for log in logs.values() for r in log)]
    columns = min(4, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // columns), columns, figsize=(3.6 * columns, 2.8 * -(-len(panels) // columns)),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (label, log) in enumerate(logs.items()):
            points = [(r["step"], r[key]) for r in log if key in r]
            if points:  # held-out EM exists only where evaluated: markers, sized so equal values stay visible
                ax.plot(*zip(*points), ("o--" if key == "eval_em" else "-"), color=f"C{i}",
                        markersize=8 - 2 * (i % 3), label=label)
        shares = ("reward", "eval_em", "format_ok", "no_signal_groups")
        ax.set(title=title, xlabel="step", **({"ylim": (-0.02, 1.02)} if key in shares else {}))
        for i, log in enumerate(logs.values()):  # the first health warning of each run, dotted
            warned = [r["step"] for r in log if r.get("warnings")]
            if warned:
                ax.axvline(warned[0], color=f"C{i}", linestyle=":", linewidth=1)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png
