"""Benchmark: OpenMP wait policies, idle and beside a competing busy process, as ratios to libgomp's default.

    python bench/thread_policy.py [--threads 2] [--rounds 3] [--json out.json]

Each workload runs in a fresh Python process (libgomp reads its environment when torch loads it) under
each policy, round-robin, ``--rounds`` times; the median time per policy is reported and divided by
the default policy's median from the same rounds. The whole sweep runs twice: idle, and with one
competing process spinning on one core (a pure-Python busy loop, like a browser tab or another job).
The load average is printed beside each block.

Workloads (``--threads`` torch threads each):
  extract   mini-CLIP vision + text features of 64 scenes at batch 16 (the demo's extract stage)
  ridge     RidgeDecoder.fit, 1,600 x 1,600 voxels -> 2,000 targets, 4 alphas x 3 folds (one eigh)
  train     one BrainMCLIP-shaped step: a 15,724 -> 2,048 -> 2,048 MLP, batch 32, backward and AdamW
  sample    mini-SD UNet at batch 1, 20 guided steps (many small kernels: where not spinning hurts)
Policies: default (libgomp: spin 300,000), passive (OMP_WAIT_POLICY=PASSIVE), spin=10000 (GOMP_SPINCOUNT),
brainmclip's spin (what ``apply_thread_policy`` sets: spin 1,000) with ``--threads`` threads, and brainmclip's
default (spin 1,000 and the thread count ``apply_thread_policy`` picks: the CPUs other processes leave idle).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import busy_process, report

WORKLOADS = ("extract", "ridge", "train", "sample")


def _workload(name: str) -> float:
    """Seconds for one run of ``name`` after a warm-up; runs inside the child process."""
    import numpy as np
    import torch

    if name == "extract":
        from brainmclip.features import ClipFeatureExtractor
        from brainmclip.features.clip_models import load_clip
        from brainmclip.miniature.world import build_bank

        bank = build_bank(64, seed=0, stream="heldout", size=64)
        extractor = ClipFeatureExtractor(load_clip("mini"))
        captions = [[c] if isinstance(c, str) else list(c)[:1] for c in bank.captions]

        def run():
            for b in range(0, 64, 16):
                extractor.encode(bank.images[b:b + 16], captions[b:b + 16])
    elif name == "ridge":
        from brainmclip.models.ridge import RidgeDecoder

        rng = np.random.default_rng(0)
        X = rng.standard_normal((2000, 1600))
        Y = X[:, :200] @ rng.standard_normal((200, 2000)) + rng.standard_normal((2000, 2000))

        def run():
            RidgeDecoder(alphas=[1e1, 1e2, 1e3, 1e4], n_folds=3).fit(X, Y)
    elif name == "train":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(15724, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 2048))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.randn(32, 15724), torch.randn(32, 2048)

        def run():
            for _ in range(3):
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    elif name == "sample":
        from brainmclip.generation.stable_diffusion import load_stable_diffusion

        pipe = load_stable_diffusion("mini")
        unet = pipe.unet
        latents = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        cond = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)

        def run():
            with torch.no_grad():
                x = latents
                for t in range(20):
                    eps = unet(torch.cat([x, x]), 999 - 50 * t, encoder_hidden_states=cond).sample
                    x = x - 0.01 * eps[:1]
    else:
        raise SystemExit(f"unknown workload {name}")
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _policies() -> dict[str, dict]:
    from brainmclip.threads import SPIN_COUNT

    return {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin=10000": {"GOMP_SPINCOUNT": "10000"},
            f"brainmclip (spin={SPIN_COUNT})": "apply", "brainmclip (spin, default threads)": "apply-default"}


def _child(workload: str, policy, threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)})
    applied = ({"apply": f"apply_thread_policy({threads}); ", "apply-default": "apply_thread_policy(); "}[policy]
               if isinstance(policy, str) else None)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            + ("from brainmclip.threads import apply_thread_policy; " + applied if applied else "")
            + f"import thread_policy as b, json; print(json.dumps(b._workload({workload!r})))")
    if policy == "apply-default":  # the thread count is the policy's own choice, not --threads
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.pop(name)
    elif policy != "apply":
        env.update(policy)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    policies = _policies()
    results: dict = {"threads": args.threads, "cpus": os.cpu_count(), "rounds": args.rounds}
    for condition in ("idle", "one busy process"):
        with busy_process(condition != "idle"):
            results[f"{condition}: load average before"] = [round(v, 2) for v in os.getloadavg()]
            for workload in args.workloads.split(","):
                times: dict[str, list[float]] = {p: [] for p in policies}
                for _ in range(args.rounds):
                    for name, policy in policies.items():
                        times[name].append(_child(workload, policy, args.threads))
                base = statistics.median(times["default"])
                for name in policies:
                    med = statistics.median(times[name])
                    results[f"{condition}: {workload} {name} s"] = round(med, 3)
                    if name != "default":
                        results[f"{condition}: {workload} {name} speed vs default"] = round(base / med, 2)
            results[f"{condition}: load average after"] = [round(v, 2) for v in os.getloadavg()]
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
