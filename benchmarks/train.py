"""Training speed and memory: Conv5_FC3 on 169x208x179 images, batch 4, Adam 1e-4, next to ClinicaDL 1.6.1.

    python benchmarks/train.py [--source_caps demo_output/caps] [--epochs 5] [--clinicadl /tmp/peer/venv1]

Builds a trivial dataset from real preprocessed brains (one hemisphere darkened per class; 2 subjects per
source brain, at most 40: 24 from the demo's 12), draws one split (20 % test, 15 % validation, the rest to
train; --baseline_sets so that ClinicaDL reads the same split files), then trains each variant in a fresh
process and reads its training.tsv: images per second in the training pass, seconds per epoch, the share of
time spent waiting for data, peak resident memory, and the validation balanced accuracy after each epoch;
and prints the CPU's vector and matrix engines, the allocator and the threads each run used. With
--clinicadl (a venv holding ClinicaDL 1.6.1, see ../shared/peer), ClinicaDL trains on the same CAPS tensors
and the same split files; its epoch time, training-pass speed and per-epoch validation loss are read from its own
log (it records no per-epoch BA).
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
from common import cpu_features, machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[labels]
column = "diagnosis"
values = ["AD", "CN"]
[split]
n_test = {n_test}
n_splits = 0
n_validation = {n_validation}
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


def ours(work: Path, name: str, extra: list[str], epochs: int, n_train: int) -> list[object]:
    out = work / "out"
    shutil.rmtree(out / "maps" / name, ignore_errors=True)
    command = [sys.executable, str(ROOT / "run.py"), str(work / "bids"), str(out), "group", "--caps_dir",
               str(work / "caps"), "--config", str(work / "experiment.toml"), "--stages", "train",
               "--experiment", name, "--epochs", str(epochs), *extra]
    wall, peak = timed(command, work / f"{name}.log")
    log = pd.read_csv(out / "maps" / name / "split-0" / "training_logs" / "training.tsv", sep="\t")
    epoch_seconds = (n_train / log.images_per_second + log.evaluation_seconds).mean()
    environment = (out / "maps" / name / "environment.txt").read_text()
    allocator = re.search(r"allocator (\S+)", environment)
    threads = re.search(r"torch threads (\d+)", environment)
    setting = f"{allocator.group(1) if allocator else '?'}, {threads.group(1) if threads else '?'} threads"
    return [f"clinicadl-app {name} ({setting})", f"{log.images_per_second.mean():.2f}", f"{epoch_seconds:.1f}",
            f"{100 * log.data_wait_share.mean():.1f} %", f"{peak:.2f}",
            " ".join(f"{v:.2f}" for v in log.BA_validation), " ".join(f"{v:.2f}" for v in log.loss_validation),
            f"{wall:.0f}"]


def clinicadl(work: Path, venv: Path, epochs: int, n_train: int, n_validation: int) -> list[object]:
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
    # ClinicaDL 1.6.1 writes no per-epoch metrics (training.tsv and tensorboard stay empty unless
    # evaluation_steps > 0) and logs the training and validation losses in the same second at the end of each
    # epoch, after its training pass and its evaluation of the training and validation sets. The evaluation pace
    # is read from its final evaluation of the selected model on the training set (load -> logged loss), and the
    # training pass is the epoch minus that pace times the images evaluated.
    text = (work / "clinicadl.log").read_text()
    stamp = r"^(\d\d:\d\d:\d\d) - "
    start = re.search(stamp + "Criterion", text, re.MULTILINE).group(1)
    ends = re.findall(stamp + r"image level validation loss is ([0-9.]+) at the end of", text, re.MULTILINE)
    loaded = re.search(stamp + "Loading model trained for split 0", text, re.MULTILINE).group(1)
    evaluated = re.search(stamp + "image level train loss is .* for model selected", text, re.MULTILINE).group(1)
    pace = (_clock(evaluated) - _clock(loaded)) / n_train
    seconds = [_clock(b) - _clock(a) for a, b in zip([start, *(t for t, _ in ends[:-1])], (t for t, _ in ends),
                                                      strict=True)]
    passes = [total - pace * (n_train + n_validation) for total in seconds]
    speed = n_train * len(passes) / sum(passes) if sum(passes) > 0 else float("nan")
    return ["ClinicaDL 1.6.1 (2 data processes)", f"{speed:.2f} (from its log)", f"{sum(seconds) / len(seconds):.0f}",
            "n/a", f"{peak:.2f}", f"best-loss model: {float(metrics.BA.iloc[0]):.2f} (none logged per epoch)",
            " ".join(f"{float(loss):.2f}" for _, loss in ends), f"{wall:.0f}"]


def _clock(stamp: str) -> int:
    hours, minutes, seconds = map(int, stamp.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_caps", type=Path, default=ROOT / "demo_output" / "caps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clinicadl-app-train-benchmark"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clinicadl", type=Path, help="a venv with ClinicaDL 1.6.1 (../shared/peer recipe)")
    parser.add_argument("--variants", help="comma-separated: fp32, amp, fp32-evaluate-train (default: fp32, and "
                        "amp where the CPU computes bfloat16 in hardware; elsewhere it is emulated, ~10x slower)")
    args = parser.parse_args()
    if args.variants is None:
        from clinicadl_app.group.runtime import native_bfloat16

        args.variants = "fp32,amp" if native_bfloat16() else "fp32"
    work: Path = args.work
    brains = len(list((args.source_caps / "subjects").glob("sub-*/ses-*")))
    n_subjects = min(40, 2 * brains)
    if n_subjects < 12:
        raise SystemExit(f"{args.source_caps}: {brains} preprocessed images; run the participant level on more")
    if not (work / "caps").exists():
        subprocess.run([sys.executable, "-m", "clinicadl_app.generate", "trivial", str(args.source_caps), str(work),
                        "--n_subjects", str(n_subjects)], check=True)
    n_subjects = len(list((work / "caps" / "subjects").glob("sub-*")))
    n_test, n_validation = max(2, round(0.2 * n_subjects)), max(2, round(0.15 * n_subjects))
    n_train = n_subjects - n_test - n_validation
    (work / "experiment.toml").write_text(CONFIG.format(n_test=n_test, n_validation=n_validation))
    subprocess.run([sys.executable, str(ROOT / "run.py"), str(work / "bids"), str(work / "out"), "group",
                    "--caps_dir", str(work / "caps"), "--config", str(work / "experiment.toml"), "--stages",
                    "labels", "split"], check=True, capture_output=True)
    variants = {"fp32": ["--no-amp"], "amp": ["--amp"], "fp32-evaluate-train": ["--no-amp", "--evaluate_train"]}
    rows = [ours(work, name, variants[name], args.epochs, n_train) for name in args.variants.split(",")]
    if args.clinicadl:
        rows.append(clinicadl(work, args.clinicadl, args.epochs, n_train, n_validation))
    print(f"machine: {machine()}")
    print(f"CPU features: {cpu_features()}")
    print(f"inputs: {n_train} training + {n_validation} validation trivial images of 169x208x179 (from "
          f"{args.source_caps}), Conv5_FC3, batch 4, Adam 1e-4, {args.epochs} epochs")
    print(table(["run", "train img/s", "s/epoch (train+eval)", "data wait", "peak RSS GiB",
                 "validation BA per epoch", "validation loss per epoch", "wall s"], rows))
    print(json.dumps({"note": "img/s is the training pass only; s/epoch adds BatchNorm recalibration and evaluation"}))


if __name__ == "__main__":
    main()
