"""Which memory allocator trains fastest: a Conv5_FC3 training step on 169x208x179 images, batch 4, fp32.

    python benchmarks/allocator.py [--steps 6]

Each allocator runs the same steps in a fresh process (the first step is a warm-up, not counted): glibc as
it comes, glibc with mmap off and no trimming (what the app does when nothing else is there), mimalloc from
the cmeel-mimalloc wheel that pip installs with the app (with the purge delay the app sets), and the
system's tcmalloc when installed. Prints seconds per step (median), images per second and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, table  # noqa: E402

from clinicadl_app.core import allocator  # noqa: E402


def child(steps: int, tuned: bool) -> None:
    import torch

    from clinicadl_app.group.networks import build_network

    if tuned:
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    model = build_network("Conv5_FC3", (1, 169, 208, 179), 2).to(memory_format=torch.channels_last_3d)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.rand(4, 1, 169, 208, 179).contiguous(memory_format=torch.channels_last_3d)
    target = torch.tensor([0, 1, 0, 1])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch), target).backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"step": statistics.median(times[1:]), "peak": peak, "allocator": allocator.preloaded()}))


def run(name: str, steps: int, preload: str | None, env: dict[str, str], tuned: bool) -> list[object]:
    environment = dict(os.environ, **env)
    if preload:
        environment["LD_PRELOAD"] = preload
    done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)] + (["--tuned"] if tuned else []),
                          env=environment, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [name, result["allocator"] or "glibc", f"{result['step']:.2f}", f"{4 / result['step']:.2f}",
            f"{result['peak']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.tuned)
        return
    rows = [run("glibc, as it comes", args.steps, None, {}, tuned=False),
            run("glibc, mmap off, no trimming", args.steps, None, {}, tuned=True)]
    wheel = allocator.wheel_mimalloc()
    if wheel:
        settings = allocator.mimalloc_settings()
        rows.append(run("mimalloc (pip wheel), app settings", args.steps, str(wheel), settings, False))
        rows.append(run("mimalloc (pip wheel), its defaults", args.steps, str(wheel), {}, False))
    system = allocator.system_tcmalloc()
    if system:
        rows.append(run("tcmalloc (system)", args.steps, str(system), {}, False))
    print(f"machine: {machine()}")
    print(f"inputs: Conv5_FC3, one batch of 4 random 1x169x208x179 images, channels-last fp32, Adam; "
          f"median of {args.steps} steps after one warm-up; torch threads = cores")
    print(table(["run", "allocator", "s/step", "img/s", "peak RSS GiB"], rows))


if __name__ == "__main__":
    main()
