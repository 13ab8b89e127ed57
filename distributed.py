"""Several GPUs: what `torchrun --nproc_per_node N searchr1.py ...` changes (docs/gpu.md).

Read by searchr1.py's train; a first read may skip it. Under torchrun there are N processes (ranks);
a plain `python searchr1.py` is rank 0 of 1 and none of this does anything. Each rank rolls out its
share of the step's questions (whole GRPO groups, so advantages need nothing from other ranks); the
loss's token count and the LoRA gradients are summed over the ranks, so every rank takes the
optimizer step one process would take on all the questions. Rank 0 alone writes files and evaluates.
It imports nothing of ours.
"""
import datetime
import os

import torch
import torch.distributed as dist

# The longest a rank waits at a collective: while rank 0 alone builds wiki-18's index on the first run
# (21M passages at ~41 s a million: ~15 min) or evaluates (200 greedy questions: minutes on a GPU). NCCL's
# default, 10 minutes, would end the run there.
TIMEOUT = datetime.timedelta(hours=1)


def world() -> tuple[int, int]:
    """(rank, number of ranks): torchrun's, or (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def backend(device_type: str) -> str:
    """The process group's backend for ranks computing on `device_type`. On GPUs, NCCL reduces the
    gradients (CUDA tensors) and gloo the scalar sums and barriers (CPU tensors): NCCL reduces only
    CUDA tensors, so a group of NCCL alone fails at the first sum of a Python number."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, the backend for this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend(device.type), timeout=TIMEOUT)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: float) -> float:
    """The sum of `value` over the ranks (itself with one process), through the group's CPU backend."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item()


def sum_gradients(parameters) -> None:
    """Each rank's gradient is its share of the mini-batch's token mean: their sum is the whole's.
    An explicit all-reduce rather than DDP's wrapper: PPO switches peft adapters between forward
    passes, and the sum reads as the maths it is."""
    if dist.is_initialized():
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def rank_share(questions: list[dict], mini_batch_size: int, samples_per_question: int) -> list[dict]:
    """This rank's questions of the step: of each optimizer step's questions, its 1/N, in order, so
    that mini-batch k of every rank together is mini-batch k of one process."""
    rank, size = world()
    per_update = mini_batch_size // samples_per_question  # questions an optimizer step covers
    share = per_update // size
    return [q for first in range(0, len(questions), per_update)
            for q in questions[first + rank * share: first + (rank + 1) * share]]


def check_split(batch_size: int, mini_batch_size: int, samples_per_question: int) -> str | None:
    """Why the step cannot be shared out in whole questions of every optimizer step, or None."""
    ranks = world()[1]
    if ranks > 1 and (mini_batch_size % (samples_per_question * ranks)
                      or batch_size % (mini_batch_size // samples_per_question)):
        return (f"with {ranks} processes, --mini-batch-size must be a multiple of {ranks} x the responses "
                f"per question ({samples_per_question}) and divide --batch-size x them, so that each rank "
                f"takes whole questions of every optimizer step (e.g. --mini-batch-size "
                f"{samples_per_question * ranks * 2})")
    return None
