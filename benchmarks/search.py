"""Search throughput: trials per hour of the search stage, next to training the same MAPS by hand.

    python benchmarks/search.py [--source_caps tests/data/caps2mm] [--downsample 1] [--trials 4]

Builds a trivial dataset from real preprocessed brains (the demo's IXI subjects at 2 mm by default, as the
tests use them; demo_output/caps with --downsample 2 gives the same grid; 24 subjects, 2 folds), labels
and splits it once, then times (1) the train stage on the base configuration, the way a user runs one
ClinicaDL random-search job by hand; (2) one search job running all trials; (3) two search jobs started
together on one study, sharing the trials. Each trial trains a full MAPS (2 folds, 1 epoch); the overhead
of the search is the difference between (1) per trial and (2). ClinicaDL's random-search is one train per
job, so (1) is its cost per trial, without the study, the leaderboard or the retries.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[labels]
column = "diagnosis"
[split]
n_test = 0.25
n_splits = 2
seed = 0
max_attempts = 20
[train]
epochs = 1
batch_size = 4
[search]
study = "{study}"
learning_rate = {{exponent = [3, 5]}}
architecture = {{choice = ["Conv5_FC3", "random"]}}
n_convblocks = {{randint = [2, 4]}}
"""


def run(work: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), str(work / "bids"), str(work / "out"), "group", "--caps_dir",
            str(work / "caps"), *args]


def timed(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    jobs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for job in jobs:
        _, err = job.communicate()
        if job.returncode:
            raise SystemExit(f"failed ({job.returncode}): {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_caps", type=Path, default=ROOT / "tests" / "data" / "caps2mm")
    parser.add_argument("--downsample", type=int, default=1)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clinicadl-app-search-benchmark"))
    args = parser.parse_args()
    work: Path = args.work
    shutil.rmtree(work / "out", ignore_errors=True)
    if not (work / "caps").exists():
        subprocess.run([sys.executable, "-m", "clinicadl_app.generate", "trivial", str(args.source_caps), str(work),
                        "--n_subjects", "24", "--downsample", str(args.downsample)], check=True)
    for study in ("one", "two"):
        (work / f"{study}.toml").write_text(CONFIG.format(study=study))
    subprocess.run(run(work, "--config", str(work / "one.toml"), "--stages", "labels", "split"), check=True,
                   capture_output=True)
    by_hand = timed([run(work, "--config", str(work / "one.toml"), "--stages", "train")])
    one = timed([run(work, "--config", str(work / "one.toml"), "--stages", "search", "--n_trials", str(args.trials))])
    half = str(args.trials // 2)
    two = timed([run(work, "--config", str(work / "two.toml"), "--stages", "search", "--n_trials", half)] * 2)
    trials = {name: pd.read_csv(work / "out" / "search" / name / "trials.tsv", sep="\t") for name in ("one", "two")}
    rows = [["train stage, one MAPS by hand (ClinicaDL: one random-search job)", 1, f"{by_hand:.0f}",
             f"{3600 / by_hand:.0f}", "-"],
            [f"search, 1 job x {args.trials} trials", (trials["one"].state == "COMPLETE").sum(), f"{one:.0f}",
             f"{3600 * args.trials / one:.0f}", f"{trials['one'].seconds.mean():.0f}"],
            [f"search, 2 jobs x {half} trials at once", (trials["two"].state == "COMPLETE").sum(), f"{two:.0f}",
             f"{3600 * args.trials / two:.0f}", f"{trials['two'].seconds.mean():.0f}"]]
    print(f"machine: {machine()}")
    print(f"inputs: 24 trivial subjects from {args.source_caps} (downsampled x{args.downsample}), 2 folds, 1 epoch, "
          "batch 4; space: learning rate, Conv5_FC3 or random architecture (2-4 blocks)")
    print(table(["run", "complete trials", "wall s", "trials per hour", "s per trial (inside the job)"], rows))


if __name__ == "__main__":
    main()
