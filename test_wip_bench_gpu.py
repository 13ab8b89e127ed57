"""`python bench.py gpu --tiny`: the GPU benchmark's own code path, run on the CPU with a tiny Qwen2 in 4-bit."""
import sys
from pathlib import Path

import pytest
import torch

import bench

QWEN_TOKENIZER = Path(__file__).resolve().parent.parent / "shared" / "data" / "qwen2.5-tokenizer"


@pytest.mark.skipif(not QWEN_TOKENIZER.exists(), reason="../shared/data/qwen2.5-tokenizer is absent")
def test_bench_gpu_tiny_times_a_real_grpo_step_on_the_forced_script_and_prints_the_full_table(monkeypatch, capsys):
    results = []  # main() dispatches to bench.bench_gpu; keep what it returns
    real_bench_gpu = bench.bench_gpu
    monkeypatch.setattr(bench, "bench_gpu", lambda args: results.append(real_bench_gpu(args)))
    # 2 questions x 2 samples in rollout chunks of 1 question, 3 turns of 12 forced tokens; a made-up
    # measured device (0.5 TB/s, 10 TFLOPS) so the consumer-card estimate is computed too
    monkeypatch.setattr(sys, "argv", ["bench.py", "gpu", "--tiny", "--questions", "2", "--group-size", "2",
                                      "--rollout-batch-size", "1", "--tokens-per-turn", "12",
                                      "--device-tbps", "0.5", "--device-tflops", "10",
                                      "--profile", "--profile-rows", "5"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)  # --tiny runs on one thread; the rest of the session keeps its own
    (r,) = results
    out = capsys.readouterr().out

    # train_step's rollout sampled exactly the script, in both chunks, and model.generate the very same tokens
    assert r["sampled_tokens"] == r["forced_tokens"] == 2 * 2 * 3 * 12
    assert r["same_tokens"] is True
    # each chunk's last turns answer "yes" (the golden answer) then "no": reward 0.5, so the update has a
    # gradient, and it moved the LoRA weights and nothing else
    assert r["reward"] == 0.5
    assert r["changed_lora"] > 0 and r["changed_frozen"] == 0
    # the phases are real, positive, and make up the step
    assert all(r[key] > 0 for key in ("rollout_s", "logprob_s", "update_s", "generate_tok_s", "peak_gb"))
    assert r["rollout_s"] + r["logprob_s"] + r["update_s"] == pytest.approx(r["step_s"])
    assert r["ours_tok_s"] == pytest.approx(r["sampled_tokens"] / r["rollout_s"])
    assert r["steps_in_3h"] == pytest.approx(3 * 3600 / r["step_s"])
    # RTX 4090 (1.008 TB/s, 165 TFLOPS): the rollout scales by bandwidth, the other phases by FLOPs
    estimate = r["estimate"]
    assert estimate["rollout_s"] == pytest.approx(r["rollout_s"] * 0.5 / 1.008)
    assert estimate["step_s"] == pytest.approx(estimate["rollout_s"] + (r["logprob_s"] + r["update_s"]) * 10 / 165)

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| device |"))
    columns = lines[header].strip("| ").split(" | ")
    for column in ("device", "model", "batch", "rollout tok/s (ours)", "rollout tok/s (generate)", "ours / generate",
                   "rollout s", "log-prob s", "update s", "step s", "peak GB", "GRPO steps in 3 h"):
        assert column in columns
    measured, estimated = (dict(zip(columns, line.strip("| ").split(" | "))) for line in lines[header + 2: header + 4])
    assert measured["device"] == "CPU (1 thread)" and measured["batch"] == "2 x 2"
    assert measured["GRPO steps in 3 h"] == f"{r['steps_in_3h']:.0f}"
    assert estimated["device"] == "RTX 4090 (estimate)"
    assert estimated["step s"] == f"{estimate['step_s']:.1f}"
    assert "OOM" not in out
    assert sum(line.startswith("  ") and ": peak memory" in line for line in lines) == 2  # targets, both rows
    # --profile: one more step under torch.profiler, its top ops
    assert "profile of one more train_step" in out and "aten::" in out



def test_a_phase_that_runs_out_of_memory_is_noted_with_its_line_and_the_bench_goes_on():
    from grpo import token_logprobs
    def model_out_of_memory(**inputs):  # a log-prob pass whose model call runs out of GPU memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.68 GiB\nof which 1 GiB is free")
    ids = torch.ones(1, 4, dtype=torch.long)
    notes = []
    class OutOfMemoryModel:
        def get_decoder(self):
            return model_out_of_memory
    failing_pass = lambda: token_logprobs(OutOfMemoryModel(), ids, torch.ones_like(ids), 2)  # noqa: E731
    assert bench._measure("train_step", failing_pass, torch.device("cpu"), notes) is None
    (note,) = notes
    assert note.startswith("train_step ran out of memory under the cap in grpo.py:") and "get_decoder()(" in note
    assert note.endswith(": CUDA out of memory. Tried to allocate 10.68 GiB")  # the message's first line
    result, seconds, peak_gb = bench._measure("a pass that fits", lambda: 42, torch.device("cpu"), notes)
    assert (result, len(notes)) == (42, 1) and seconds >= 0 and peak_gb > 0
