"""Benchmark: one BrainMCLIP training step at subject-1 sizes on CPU, as a share of matmul peak.

    python bench/train_step_flops.py [--batch-size 32] [--semantic-voxels 3086] [--detail-voxels 8747]

In the same run it measures this machine's fp32 matmul rate (square GEMMs) and then times
full training steps (forward, loss, backward, AdamW step) of the default BrainMCLIP config
(about 0.76B parameters; 768-wide, 257 + 77 token targets), first with glibc's default
allocator behaviour, then as ``brainmclip train`` runs on CPU (``keep_freed_memory``).

The FLOPs of a step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + loss + backward: every matmul that runs, including the shared image backbone and
decoder D_I applied to both image codes (2 x batch rows) and the crossed fMRI decoders. The
optimizer adds no matmul FLOPs. ``naive_gflop`` is 6 x batch x linear weights for comparison,
which misses the second use of the shared modules. The ratio of achieved FLOP/s to the
measured matmul rate is what to compare across machines (goal >= 0.4).
Needs about 14 GB of memory (weights, gradients and AdamW state in fp32).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from _results import report
from torch.utils.flop_counter import FlopCounterMode

from brainmclip.config import load_config
from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, brain_mclip_objective
from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig
from brainmclip.training.cpu_memory import keep_freed_memory


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    peak = matmul_rate()
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

    def step(with_optimizer: bool = True) -> float:
        start = time.perf_counter()
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
    step()  # warm-up, allocates optimizer state
    t_default = min(step() for _ in range(args.steps))
    with keep_freed_memory() as kept:
        step()  # first step under the setting still page-faults its buffers in
        t_full = min(step() for _ in range(args.steps))
        t_fwd_bwd = min(step(with_optimizer=False) for _ in range(args.steps))
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": n,
        "matmul_gflops": round(peak / 1e9, 1),
        "step_gflop": round(flops / 1e9, 1),
        "naive_gflop": round(naive / 1e9, 1),
        "step_s": round(t_full, 3),
        "step_gflops": round(flops / t_full / 1e9, 1),
        "ratio_step": round(flops / t_full / peak, 3),
        "fwd_bwd_s": round(t_fwd_bwd, 3),
        "ratio_fwd_bwd": round(flops / t_fwd_bwd / peak, 3),
        "step_s_glibc_default": round(t_default, 3),
        "ratio_step_glibc_default": round(flops / t_default / peak, 3),
        "keep_freed_memory": kept,
        "goal": ">= 0.4 (ratio_step)",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
