"""Benchmark: one BrainMCLIP training step at subject-1 sizes on CPU, as a share of matmul peak.

    python bench/train_step_flops.py [--batch-size 32] [--semantic-voxels 3086] [--detail-voxels 8747]
                                     [--rounds 5] [--busy] [--bf16] [--json out.json]

It times full training steps (forward, loss, backward, AdamW step) of the default BrainMCLIP config
(about 0.76B parameters; 768-wide, 257 + 77 token targets) as ``brainmclip train`` runs them on CPU
(``keep_freed_memory``), and measures this machine's fp32 matmul rate (square 2048 GEMMs) right
before each step, alternating, so that a ratio compares a step with the rate the machine had at
that moment: on a shared CPU the rate swings by 2x and more between minutes. ``--busy`` runs it all
beside one competing busy process. The same is done for forward + backward without the optimizer.

``--bf16`` adds, in the same rounds, the step under CPU bf16 autocast (``train.mixed_precision:
bf16-always``) with its own baseline, the bf16 matmul rate (square 2048 GEMMs in bf16), and the
step's speed-up over the fp32 step. bf16 matmuls are fast only on CPUs with native bf16
instructions (AVX512-BF16, AMX); elsewhere they are emulated and slow.

The FLOPs of a step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + loss + backward: every matmul that runs, including the shared image backbone and
decoder D_I applied to both image codes (2 x batch rows) and the crossed fMRI decoders. The
optimizer adds no matmul FLOPs. ``naive_gflop`` is 6 x batch x linear weights for comparison,
which misses the second use of the shared modules. The ratio of achieved FLOP/s to the
measured matmul rate is what to compare across machines (goal >= 0.5); the median over
``--rounds`` interleaved pairs is reported with its range and the load average.
Needs about 14 GB of memory (weights, gradients and AdamW state in fp32).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from _results import busy_process, load_average, report
from torch.utils.flop_counter import FlopCounterMode

from brainmclip.config import load_config
from brainmclip.cpu_memory import keep_freed_memory
from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, brain_mclip_objective
from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig


def matmul_rate(size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--semantic-voxels", type=int, default=3086)
    parser.add_argument("--detail-voxels", type=int, default=8747)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved (matmul rate, step) pairs")
    parser.add_argument("--busy", action="store_true", help="run beside one competing busy process")
    parser.add_argument("--bf16", action="store_true", help="also time the step under CPU bf16 autocast")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with busy_process(args.busy):
        return _run(args)


def _run(args) -> int:
    import statistics

    cfg = load_config("brain_mclip")
    torch.manual_seed(0)
    model = BrainMCLIP(BrainMCLIPConfig.from_dict({**cfg["model"], "n_semantic_voxels": args.semantic_voxels,
                                                   "n_detail_voxels": args.detail_voxels}))
    loss_cfg = ObjectiveConfig.from_dict(cfg["loss"])
    # fused: one kernel over all parameters (the step is memory-bound at 0.76B parameters).
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    n = args.batch_size
    batch = {"semantic": torch.randn(n, args.semantic_voxels), "detail": torch.randn(n, args.detail_voxels),
             "image_semantic": torch.randn(n, 257, 768), "image_detail": torch.randn(n, 257, 768),
             "text": torch.randn(n, 77, 768)}

    def step(with_optimizer: bool = True, bf16: bool = False) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the training loop wraps them
            out = model(batch["semantic"], batch["detail"])
            loss, _ = brain_mclip_objective(out, batch, batch["semantic"], batch["detail"], loss_cfg)
        loss.backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as in training: no accumulation into old grads
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        step(with_optimizer=False)
    flops = counter.get_total_flops()
    naive = 6 * n * linear_weights(model)
    load_before = load_average()
    kinds = ("step", "fwd_bwd") + (("step_bf16",) if args.bf16 else ())
    ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    rates, rates_bf16 = [], []
    with keep_freed_memory() as kept:
        step()  # warm-up: allocates the optimizer state, page-faults the buffers in
        if args.bf16:
            step(bf16=True)
        for _ in range(args.rounds):
            for kind in kinds:
                bf16 = kind == "step_bf16"
                rate = matmul_rate(dtype=torch.bfloat16 if bf16 else torch.float32)
                t = step(with_optimizer=kind != "fwd_bwd", bf16=bf16)
                (rates_bf16 if bf16 else rates).append(rate)
                seconds[kind].append(t)
                ratios[kind].append(flops / t / rate)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": n,
        "busy_process": args.busy,
        "load_average": [load_before, load_average()],
        "step_gflop": round(flops / 1e9, 1),
        "naive_gflop": round(naive / 1e9, 1),
        "matmul_gflops_median": round(statistics.median(rates) / 1e9, 1),
        "matmul_gflops_range": [round(min(rates) / 1e9, 1), round(max(rates) / 1e9, 1)],
        "step_s_median": round(statistics.median(seconds["step"]), 3),
        "ratio_step_median": round(statistics.median(ratios["step"]), 3),
        "ratio_step_range": [round(min(ratios["step"]), 3), round(max(ratios["step"]), 3)],
        "fwd_bwd_s_median": round(statistics.median(seconds["fwd_bwd"]), 3),
        "ratio_fwd_bwd_median": round(statistics.median(ratios["fwd_bwd"]), 3),
        "keep_freed_memory": kept,
        **(_bf16_result(seconds, ratios, rates_bf16) if args.bf16 else {}),
        "goal": ">= 0.5 (ratio_step_median)",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }
    report(result, args.json)
    return 0


def _bf16_result(seconds: dict, ratios: dict, rates: list[float]) -> dict:
    import statistics

    # per round: the fp32 step and the bf16 step ran seconds apart, so their ratio is paired
    speedups = [a / b for a, b in zip(seconds["step"], seconds["step_bf16"], strict=True)]
    return {
        "bf16_matmul_gflops_median": round(statistics.median(rates) / 1e9, 1),
        "bf16_step_s_median": round(statistics.median(seconds["step_bf16"]), 3),
        "bf16_ratio_step_median": round(statistics.median(ratios["step_bf16"]), 3),
        "bf16_speedup_over_fp32_median": round(statistics.median(speedups), 2),
        "bf16_speedup_range": [round(min(speedups), 2), round(max(speedups), 2)],
    }


if __name__ == "__main__":
    sys.exit(main())
