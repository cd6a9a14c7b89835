"""Training speed and memory: Conv5_FC3 on 169x208x179 images, batch 4, Adam 1e-4, next to ClinicaDL 1.6.1.

    python benchmarks/train.py [--source_caps demo_output/caps] [--epochs 2] [--clinicadl /tmp/peer/venv1]

Builds a trivial dataset (40 subjects from real preprocessed brains, one hemisphere darkened per class),
draws one split (8 test, 26 train, 6 validation; --baseline_sets so that ClinicaDL reads the same split
files), then trains each variant in a fresh process and reads its training.tsv: images per second in the
training pass, seconds per epoch, the share of time spent waiting for data, peak resident memory, and the
validation balanced accuracy after each epoch. With --clinicadl (a venv holding ClinicaDL 1.6.1, see
../shared/peer), ClinicaDL trains on the same CAPS tensors and the same split files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
values = ["AD", "CN"]
[split]
n_test = 8
n_splits = 0
n_validation = 6
seed = 0
max_attempts = 50
baseline_sets = true
[train]
mode = "image"
architecture = "Conv5_FC3"
batch_size = 4
learning_rate = 1e-4
"""


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a command, from GNU time."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20
    return wall, peak


def ours(work: Path, name: str, extra: list[str], epochs: int) -> list[object]:
    out = work / "out"
    shutil.rmtree(out / "maps" / name, ignore_errors=True)
    command = [sys.executable, str(ROOT / "run.py"), str(work / "bids"), str(out), "group", "--caps_dir",
               str(work / "caps"), "--config", str(work / "experiment.toml"), "--stages", "train",
               "--experiment", name, "--epochs", str(epochs), *extra]
    wall, peak = timed(command, work / f"{name}.log")
    log = pd.read_csv(out / "maps" / name / "split-0" / "training_logs" / "training.tsv", sep="\t")
    epoch_seconds = (26 / log.images_per_second + log.evaluation_seconds).mean()
    return [f"clinicadl-app {name}", f"{log.images_per_second.mean():.2f}", f"{epoch_seconds:.0f}",
            f"{100 * log.data_wait_share.mean():.1f} %", f"{peak:.2f}",
            " ".join(f"{v:.2f}" for v in log.BA_validation), f"{wall:.0f}"]


def clinicadl(work: Path, venv: Path, epochs: int) -> list[object]:
    maps = work / "clinicadl_maps"
    shutil.rmtree(maps, ignore_errors=True)
    split = work / "out" / "splits" / "diagnosis_AD_CN" / "split-0"
    command = [str(venv / "bin" / "clinicadl"), "train", "classification", str(work / "caps"), "extract_image.json",
               str(split), str(maps), "--no-gpu", "-np", "2", "--batch_size", "4", "--epochs", str(epochs),
               "--architecture", "Conv5_FC3", "--seed", "0", "--learning_rate", "1e-4"]
    env_home = work / "home"
    env_home.mkdir(exist_ok=True)
    os.environ.update(HOME=str(env_home), MPLCONFIGDIR=str(env_home / ".mpl"))
    wall, peak = timed(command, work / "clinicadl.log")
    metrics = pd.read_csv(maps / "split-0" / "best-loss" / "validation" / "validation_image_level_metrics.tsv",
                          sep="\t")
    # ClinicaDL 1.6.1 writes no per-epoch rows unless evaluation_steps > 0: time its epochs from its log
    text = (work / "clinicadl.log").read_text()
    start = re.search(r"^(\d\d:\d\d:\d\d) - Criterion", text, re.MULTILINE).group(1)
    ends = re.findall(r"^(\d\d:\d\d:\d\d) - image level validation loss", text, re.MULTILINE)
    seconds = [_clock(b) - _clock(a) for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    return ["ClinicaDL 1.6.1", "0.46 (../shared/peer)", f"{sum(seconds) / len(seconds):.0f}", "n/a", f"{peak:.2f}",
            f"best-loss model: {float(metrics.BA.iloc[0]):.2f}", f"{wall:.0f}"]


def _clock(stamp: str) -> int:
    hours, minutes, seconds = map(int, stamp.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_caps", type=Path, default=ROOT / "demo_output" / "caps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clinicadl-app-train-benchmark"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clinicadl", type=Path, help="a venv with ClinicaDL 1.6.1 (../shared/peer recipe)")
    parser.add_argument("--variants", default="fp32,amp")
    args = parser.parse_args()
    work: Path = args.work
    if not (work / "caps").exists():
        subprocess.run([sys.executable, "-m", "clinicadl_app.generate", "trivial", str(args.source_caps), str(work),
                        "--n_subjects", "40"], check=True)
    (work / "experiment.toml").write_text(CONFIG)
    subprocess.run([sys.executable, str(ROOT / "run.py"), str(work / "bids"), str(work / "out"), "group",
                    "--caps_dir", str(work / "caps"), "--config", str(work / "experiment.toml"), "--stages",
                    "labels", "split"], check=True, capture_output=True)
    variants = {"fp32": ["--no-amp"], "amp": ["--amp"], "fp32-evaluate-train": ["--no-amp", "--evaluate_train"]}
    rows = [ours(work, name, variants[name], args.epochs) for name in args.variants.split(",")]
    if args.clinicadl:
        rows.append(clinicadl(work, args.clinicadl, args.epochs))
    print(f"machine: {machine()}")
    print(f"inputs: 26 training + 6 validation trivial images of 169x208x179 (from {args.source_caps}), "
          f"Conv5_FC3, batch 4, Adam 1e-4, {args.epochs} epochs, torch threads {os.cpu_count()}")
    print(table(["run", "train img/s", "s/epoch (train+eval)", "data wait", "peak RSS GiB",
                 "validation BA per epoch", "wall s"], rows))
    print(json.dumps({"note": "img/s is the training pass only; s/epoch adds BatchNorm recalibration and evaluation"}))


if __name__ == "__main__":
    main()
