r"""Peak memory and seconds of one training step and one inference step, GeoReg vs EOIR.

Every (model, step, size) runs in a fresh Python subprocess, so a peak cannot leak from one
configuration into the next:

* CPU: peak resident memory from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc does
  not see torch's allocator). Reported as the process peak and as the increase over the peak
  measured just before the first step (imports, model, inputs), which is what the step costs.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not
  the caching allocator's reserve or the CUDA context).

A training step is what ``eoir-train`` does per iteration: the architecture's objective
(``OBJECTIVES``), backward, Adam step; the model is in channels-last-3d on CPU as in the trainer.
An inference step is ``model(fixed, moving)`` under ``torch.no_grad()`` in eval mode. Inputs are
smooth random volumes in [0, 1]. Times are the median over ``--repeats`` steps after one warm-up
step (oneDNN builds its kernels on the first call). Nothing is asserted: this prints figures.

    python benchmarks/bench_georeg_vs_eoir.py --sizes 64x64x64 96x112x96 --threads 1
    python benchmarks/bench_georeg_vs_eoir.py --device cuda \
        --georeg-config '{"mixed_precision": true}'
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

ROOT = Path(__file__).resolve().parents[1]
EOIR_CONFIG = {"channels": 8, "levels": 5}


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size must be N or DxHxW, got {text!r}")
    return tuple(parts)


def _rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(args) -> dict:
    """One configuration, in this (fresh) process."""
    sys.path.insert(0, str(ROOT / "EOIRRegistration"))
    import torch

    from EOIRRegistrationLib.core import spatial
    from EOIRRegistrationLib.models import build_model
    from EOIRRegistrationLib.models.complexity import count_parameters
    from EOIRRegistrationLib.training.objectives import OBJECTIVES, ObjectiveConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = json.loads(args.config)
    model = build_model(args.model, config).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    shape = _parse_size(args.size)
    gen = torch.Generator().manual_seed(1)

    def volume():
        v = spatial.gaussian_blur(torch.rand(1, 1, *shape, generator=gen), 2.0)
        return ((v - v.min()) / (v.max() - v.min())).to(device)

    fixed, moving = volume(), volume()
    if args.step == "train":
        model.train()
        objective = OBJECTIVES[args.model]
        obj_cfg = ObjectiveConfig()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            terms = objective(model, fixed, moving, obj_cfg)
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(fixed, moving)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = _rss_mib()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for i in range(args.repeats + 1):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t)
    out = {"model": args.model, "config": config, "step": args.step, "size": list(shape),
           "device": str(device), "threads": torch.get_num_threads(),
           "parameters": count_parameters(model), "seconds_median": statistics.median(times),
           "seconds_all": [round(t, 4) for t in times]}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["peak_over_base_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["peak_mib"] = _rss_mib()
        out["peak_over_base_mib"] = _rss_mib() - base_rss
    return out


def run_one(model: str, config: dict, step: str, size: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--config",
           json.dumps(config), "--step", step, "--size", size, "--device", args.device,
           "--repeats", str(args.repeats), "--threads", str(args.threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": model, "step": step, "size": size, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["64x64x64", "96x112x96"],
                   help="input sizes N or DxHxW (array order); multiples of 16 for EOIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--models", nargs="+", default=["eoir", "georeg"], choices=["eoir", "georeg"])
    p.add_argument("--steps", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--eoir-config", default=json.dumps(EOIR_CONFIG))
    p.add_argument("--georeg-config", default="{}", help="GeoRegConfig overrides (JSON)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--json", default=None, help="also write all results to this file")
    # Internal: one configuration in a fresh process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.threads == 0:
            args.threads = None
        print(json.dumps(worker(args)))
        return 0
    configs = {"eoir": json.loads(args.eoir_config), "georeg": json.loads(args.georeg_config)}
    results = []
    header = (f"{'size':>11} {'step':>5} {'model':>6} {'params':>8} {'seconds':>8} "
              f"{'peak MiB':>9} {'step MiB':>9}")
    print(f"device {args.device}, threads {args.threads or 'torch default'}, median of "
          f"{args.repeats} after 1 warm-up; EOIR {configs['eoir']}, GeoReg {configs['georeg']}")
    print(header)
    for size in args.sizes:
        for step in args.steps:
            for model in args.models:
                r = run_one(model, configs[model], step, size, args)
                results.append(r)
                if "error" in r:
                    print(f"{size:>11} {step:>5} {model:>6} failed: {r['error']}", flush=True)
                    continue
                print(f"{size:>11} {step:>5} {model:>6} {r['parameters']:>8} "
                      f"{r['seconds_median']:>8.3f} {r['peak_mib']:>9.0f} "
                      f"{r['peak_over_base_mib']:>9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
