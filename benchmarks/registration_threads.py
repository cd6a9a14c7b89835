"""How much t1-linear's result depends on the ITK thread count, next to its run-to-run variation.

Each run registers the same scan in a fresh process with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS set, as the
participant level's workers do; pairs of runs are compared by the largest displacement of their affines at
the corners of a 100 mm cube and by the correlation of the cropped images.

    python benchmarks/registration_threads.py [SCAN] [--threads 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCAN = ROOT / "demo" / "bids" / "sub-IXI132HH1415" / "anat" / "sub-IXI132HH1415_T1w.nii.gz"
ONE_RUN = """
import sys, time
import numpy as np
from pathlib import Path
from clinicadl_app.participant.t1_linear import run_t1_linear, transform_matrix
scan, out = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
result = run_t1_linear(scan, out, 0, 0.3)
np.save(out / "image.npy", result.cropped)
np.save(out / "affine.npy", transform_matrix(result.transform))
print(round(time.perf_counter() - start, 1))
"""


def run(scan: Path, threads: int, folder: Path) -> tuple[float, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(scan), str(folder)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1]), np.load(folder / "image.npy"), np.load(folder / "affine.npy")


def displacement(a: np.ndarray, b: np.ndarray) -> float:
    corners = np.array([[x, y, z, 1.0] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)]).T
    return float(np.abs((a - b) @ corners)[:3].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", nargs="?", type=Path, default=DEFAULT_SCAN)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for repeat in range(args.repeats):
                runs[(threads, repeat)] = run(args.scan, threads, Path(tmp) / f"t{threads}-{repeat}")
    rows = []
    for (key_a, (_, image_a, affine_a)), (key_b, (_, image_b, affine_b)) in itertools.combinations(runs.items(), 2):
        kind = "same threads" if key_a[0] == key_b[0] else "other threads"
        r = float(np.corrcoef(image_a.ravel(), image_b.ravel())[0, 1])
        rows.append([f"{key_a[0]} thr #{key_a[1]} vs {key_b[0]} thr #{key_b[1]}", kind,
                     f"{displacement(affine_a, affine_b):.3f}", f"{r:.6f}"])
    print(f"machine: {machine()}")
    print(f"scan: {args.scan}")
    print(table(["threads", "seconds"], [[f"{k[0]} (#{k[1]})", v[0]] for k, v in runs.items()]))
    print()
    print(table(["pair", "kind", "max displacement (mm)", "image r"], rows))


if __name__ == "__main__":
    main()
