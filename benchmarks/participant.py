"""Seconds per step and peak memory of t1-linear per subject, on the shared raw scans.

    python benchmarks/participant.py [SCAN ...] [--threads N]

Each scan runs in its own process (peak RSS is per subject). Clinica's t1-linear reports "about
6 minutes per image" on this kind of machine; the goal is under 60 s per subject on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def one(scan: Path, threads: int) -> dict:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    from clinicadl_app.participant.t1_linear import run_t1_linear

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_t1_linear(scan, Path(tmp))
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"timings": result.timings, "total": total, "peak_mib": peak, "r": result.qc.correlation,
            "retried": result.retried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.scans[0], args.threads)))
        return
    scans = args.scans or sorted(SHARED.glob("raw1mm_bids/sub-*/anat/*_T1w.nii.gz")) + sorted(
        SHARED.glob("ixi_bids/sub-*/anat/*_T1w.nii.gz"))[:3]
    import nibabel as nib

    rows = []
    for scan in scans:
        done = subprocess.run([sys.executable, __file__, str(scan), "--threads", str(args.threads), "--child"],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        img = nib.load(str(scan))
        timings = result["timings"]
        rows.append([
            scan.name.split("_")[0], "x".join(map(str, img.shape[:3])),
            "x".join(f"{z:.2f}" for z in img.header.get_zooms()[:3]),
            f"{timings.get('n4', 0):.1f}", f"{timings.get('registration', 0):.1f}",
            f"{timings.get('resample_qc', 0):.1f}",
            f"{sum(v for k, v in timings.items() if 'retry' in k):.1f}",
            f"{result['total']:.1f}", f"{result['peak_mib']:.0f}", f"{result['r']:.3f}",
        ])
    print(f"machine: {machine()}; ITK threads per subject: {args.threads}")
    print("t1-linear per subject (seconds; peak resident memory in MiB); reference: Clinica t1-linear ~360 s")
    print(table(["subject", "shape", "voxel mm", "N4", "registration", "resample+QC", "retry",
                 "total", "peak MiB", "QC r"], rows))


if __name__ == "__main__":
    main()
