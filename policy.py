"""The policy on its device: which model, which device and dtype, how it is loaded (4-bit base + LoRA),
what the rollout samples from, and the chunk sizes that fit the GPU's memory.

Read by searchr1.py's train, by agent.py (a trained agent) and bench.py; a first read may skip it.

    load_policy        the tokenizer and the trainable policy: NF4 base + LoRA adapter (PPO: + critic)
    pick_device        --device; under torchrun the GPU that LOCAL_RANK names
    pick_dtype         the compute dtype and why: bfloat16, or float16 with loss scaling on older GPUs
    sampling_model     --rollout-weights: the policy itself, or a merged 16-bit copy for the rollout
    fit_to_memory      the rollout chunk and micro-batch the memory plan (plan.py) fits on the card
"""
import contextlib
import dataclasses
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import torch

import grpo
import plan
from cli import UsageError
from ppo import add_critic
from rollout import build_prompt

# Short names for the usual models; any hub id or local folder works as --model too.
MODELS = {
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",  # the design target
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
}


def resolve_model(name: str) -> str:
    if name in MODELS or Path(name).exists():
        return MODELS.get(name, name)
    if "/" not in name:
        raise UsageError(f"unknown model {name!r}: use a hub id (org/name), a local folder, "
                         f"or one of {', '.join(MODELS)}")
    return name


def pick_device(cfg) -> torch.device:
    """--device; under torchrun a process's GPU is the one its LOCAL_RANK names."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible (check nvidia-smi and the torch build)")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg.device == "auto" or cfg.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(cfg.device)


def pick_dtype(cfg, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype the base model computes in, and why. LoRA weights, their gradients and AdamW's state
    stay float32 whatever it is (peft keeps adapters in float32 on a 16-bit base)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), f"--dtype {cfg.dtype}"
    if device.type != "cuda":
        return torch.float32, "the CPU computes in float32"
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):  # T4, V100, RTX 20xx only emulate it
        return torch.bfloat16, f"{name} has bfloat16"
    return torch.float16, f"{name} has no bfloat16: float16, with loss scaling against underflow"


def load_policy(cfg, device: torch.device):
    """The tokenizer and the trainable policy: (4-bit) base + LoRA adapter, on `device`."""
    # bitsandbytes' CPU backend (imported by peft) logs that an optional kernel package is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    path = resolve_model(cfg.model)
    dtype, _ = pick_dtype(cfg, device)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype) if cfg.load_4bit else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device})
    if cfg.load_4bit and device.type == "cpu":
        # bitsandbytes 0.50 repacks a 4-bit weight for fast CPU inference the first time its layer
        # runs in eval mode (the rollout), and the repacked layout then fails in backward: keep one
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:  # activation_checkpointing_enable from transformers 5.23; the old name warns
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a question it has deprecated: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    if cfg.algo == "ppo":  # the critic: a second adapter and a value head on the same base (ppo.py)
        add_critic(model)
    return tokenizer, model


def uses_chat_template(cfg, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template. 'auto' follows the reference's dataset
    code: the template whenever the tokenizer has one, base models included (Qwen2.5 base ships one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat == "yes" and not has_template:
        raise UsageError(f"--chat yes, but the tokenizer of {cfg.model} has no chat template: use --chat no or auto")
    return has_template if cfg.chat == "auto" else cfg.chat == "yes"


def merged_copy(model, dtype: torch.dtype):
    """A plain copy of the policy in the compute dtype for sampling, the adapter merged in:
    W = dequantize(W_nf4) + (alpha / r) B A for every linear, so a decode step runs one matmul a linear
    instead of a dequantize, the 4-bit matmul and two LoRA matmuls. The embeddings, norms and output
    layer are the policy's own tensors, shared, not copied."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    policy = grpo.causal_lm(model)
    merged = {}  # module name -> its merged weight (and bias)
    def inside_merged(name: str) -> bool:  # in a module already merged (a LoRA layer's base_layer, lora_A, ...)
        parts = name.split(".")
        return any(".".join(parts[:i]) in merged for i in range(1, len(parts)))
    for name, module in policy.named_modules():
        adapted = isinstance(module, LoraLayer)
        base = module.get_base_layer() if adapted else module
        quantized = hasattr(getattr(base, "weight", None), "quant_state")
        if inside_merged(name) or not (adapted or quantized):
            continue
        weight = base.weight
        if quantized:  # NF4, unpacked to the compute dtype as its own matmul unpacks it
            import bitsandbytes.functional
            weight = bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
        if adapted:
            weight = weight + module.get_delta_weight(model.active_adapter).to(weight.dtype)  # + (alpha / r) B A
        merged[name] = {"weight": weight.to(dtype), **({"bias": base.bias} if base.bias is not None else {})}
    weights = {key: value for key, value in policy.state_dict().items() if not inside_merged(key)}
    weights |= {f"{name}.{key}": value for name, tensors in merged.items() for key, value in tensors.items()}
    with torch.device("meta"):  # no memory until the weights are put in
        copy = AutoModelForCausalLM.from_config(policy.config, dtype=dtype)
    copy.load_state_dict(weights, assign=True)
    for name, buffer in policy.named_buffers():  # RoPE's frequencies are not in the state dict
        module, _, key = name.rpartition(".")
        copy.get_submodule(module)._buffers[key] = buffer
    copy.generation_config = policy.generation_config  # the EOS ids a turn ends at
    return copy.eval()


@contextlib.contextmanager
def sampling_model(model, cfg, device):
    """What the rollout samples from (--rollout-weights): the policy itself, or its merged copy, freed after."""
    if cfg.rollout_weights == "adapter":
        yield model
        return
    copy = merged_copy(model, pick_dtype(cfg, device)[0])
    try:
        yield copy
    finally:
        del copy
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the copy's memory back for the update


def memory_plan(cfg, shape: plan.Shape, gb: float, dtype_bytes: int, prompt_tokens: int) -> plan.Plan:
    """plan.memory_plan for this run's settings: a rollout or micro-batch size given (not 0) is kept."""
    response = (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens  # the budget
    return plan.memory_plan(
        shape, gb, load_4bit=cfg.load_4bit, dtype_bytes=dtype_bytes, lora_rank=cfg.lora_r,
        adapters=2 if cfg.algo == "ppo" else 1, questions=cfg.batch_size,
        samples_per_question=cfg.samples_per_question, mini_batch_size=cfg.mini_batch_size,
        prompt_tokens=prompt_tokens, response_tokens=response, new_tokens=max(prompt_tokens, cfg.max_obs_tokens + 1),
        eval_batch_size=cfg.eval_batch_size, rollout_weights=cfg.rollout_weights,
        rollout_batch_size=cfg.rollout_batch_size, micro_batch_size=cfg.micro_batch_size)


def fit_to_memory(cfg, model, tokenizer, questions: list[dict], device) -> tuple:
    """(cfg with the sizes left at 0 (auto) set, the plan): the largest rollout chunk and micro-batch that
    plan.memory_plan fits in the GPU (or --gpu-memory-gb); without a GPU, 16 questions and 8
    trajectories, and no plan. A plan that does not fit is a UsageError."""
    gb = cfg.gpu_memory_gb or (torch.cuda.get_device_properties(device).total_memory / 2**30
                               if device.type == "cuda" else 0)
    if not gb:
        return dataclasses.replace(cfg, rollout_batch_size=cfg.rollout_batch_size or 16,
                                   micro_batch_size=cfg.micro_batch_size or 8), None
    chat = uses_chat_template(cfg, tokenizer)
    prompt = max(len(build_prompt(q["question"], tokenizer, chat)) for q in questions[:1000])
    budget = memory_plan(cfg, plan.Shape.of(model.config.get_text_config()), gb,
                         pick_dtype(cfg, device)[0].itemsize, prompt)
    if not budget.fits:
        raise UsageError(f"the plan does not fit {gb:g} GB (peak {budget.peak_gb:.1f} GB): lower "
                         "--rollout-batch-size, --micro-batch-size or --eval-batch-size, or the length budgets "
                         "(--max-new-tokens, --max-obs-tokens, --max-turns), or use a card with more memory")
    fitted = dataclasses.replace(cfg, rollout_batch_size=budget.rollout_batch_size,
                                 micro_batch_size=budget.micro_batch_size, rollout_weights=budget.rollout_weights)
    return fitted, budget


def clock(device) -> float:
    """time.time() once the GPU has run the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
