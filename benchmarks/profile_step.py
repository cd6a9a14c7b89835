"""Where a training step's time goes: torch.profiler over Conv5_FC3 steps, per memory layout and precision.

    python benchmarks/profile_step.py [--shape 169 208 179] [--batch 4] [--steps 2] [--amp] [--top 12]

Run it through run.py's allocator (LD_PRELOAD is set for you from the cmeel-mimalloc wheel). For each layout
(channels-last, contiguous) it prints the seconds per training step (the trainer's fused Adam), per BatchNorm
recalibration batch and per evaluation batch (no gradients), and the operators with the most self CPU time,
so that a choice (layout, precision, fusion) can be argued from this machine's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_features, machine, table  # noqa: E402

from clinicadl_app.core import allocator  # noqa: E402


def profile_layout(fmt, args: argparse.Namespace) -> tuple[dict[str, float], list[list[object]]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from clinicadl_app.core.config import Train
    from clinicadl_app.group.networks import build_network
    from clinicadl_app.group.training import make_optimizer

    torch.manual_seed(0)
    model = build_network("Conv5_FC3", (1, *args.shape), 2).to(memory_format=fmt)
    optimiser = make_optimizer(model, Train())  # the trainer's (fused Adam)
    inputs = torch.rand(args.batch, 1, *args.shape).contiguous(memory_format=fmt)
    target = torch.arange(args.batch) % 2

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            output = model(inputs)
        torch.nn.functional.cross_entropy(output.float(), target).backward()
        optimiser.step()

    @torch.no_grad()
    def forward(training: bool) -> None:
        """A BatchNorm recalibration batch (training mode) or an evaluation batch, as the trainer runs them."""
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            model(inputs)
        model.train()

    seconds = {"step": timed(step, args.steps), "recalibration batch": timed(lambda: forward(True), args.steps),
               "evaluation batch": timed(lambda: forward(False), args.steps)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    return seconds, [[e.key, f"{e.self_cpu_time_total / 1e6 / args.steps:.2f}",
                      f"{100 * e.self_cpu_time_total / total:.0f}", e.count // args.steps] for e in events]


def timed(run, repeats: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(169, 208, 179))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    allocator.restart_with_fast_allocator()

    import torch

    print(f"machine: {machine()}; engines: {cpu_features()}; allocator: {allocator.preloaded() or 'glibc'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"inputs: Conv5_FC3, batch {args.batch} of 1x{'x'.join(map(str, args.shape))} random images, "
          f"{'bfloat16 autocast' if args.amp else 'float32'}, fused Adam; a warm-up, then {args.steps} of each "
          f"timed and {args.steps} steps profiled")
    for name, fmt in (("channels-last", torch.channels_last_3d), ("contiguous", torch.contiguous_format)):
        seconds, rows = profile_layout(fmt, args)
        print(f"\n{name}: {seconds['step']:.2f} s/step ({args.batch / seconds['step']:.2f} img/s), "
              + ", ".join(f"{what} {s:.2f} s" for what, s in seconds.items() if what != "step")
              + "; the profiled steps:")
        print(table(["operator", "self s/step", "% of self time", "calls/step"], rows))
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")


if __name__ == "__main__":
    main()
