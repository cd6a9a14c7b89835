"""Data-parallel throughput: one process against torchrun's 2 processes (gloo on CPUs, NCCL on GPUs).

    python benchmarks/distributed.py [--source_caps tests/data/caps2mm] [--n_subjects 28] [--epochs 2]

Builds a trivial dataset from real preprocessed brains (2 mm by default, or any CAPS of t1-linear images), draws
one split, then trains fold 0 of Conv5_FC3 (global batch 4) in a fresh run per variant: one process with every
CPU, 2 processes sharing them, 2 processes with --sync_batchnorm. It prints the machine, the inputs, and per
variant the training pass in images per second, the wall time per epoch and the validation BA after each epoch.
ClinicaDL 1.6.1 has no data-parallel training (its --multi_gpu is torch's DataParallel, one process), so there is
no peer column.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clinicadl_app.generate import TRIVIAL_SPLIT  # noqa: E402

CONFIG = TRIVIAL_SPLIT + """
[train]
mode = "image"
architecture = "Conv5_FC3"
batch_size = 4
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_caps", type=Path, default=ROOT / "tests" / "data" / "caps2mm")
    parser.add_argument("--n_subjects", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from clinicadl_app.generate import Trivial, generate_trivial
    from clinicadl_app.layouts.caps import Caps

    work = args.work or Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    data = work / "data"
    if not (data / "caps").exists():
        generate_trivial(Caps(args.source_caps), data, Trivial(n_subjects=args.n_subjects, seed=0))
    (data / "experiment.toml").write_text(CONFIG)
    common = [str(ROOT / "run.py"), str(data / "bids")]
    options = ["group", "--caps_dir", str(data / "caps"), "--config", str(data / "experiment.toml"),
               "--epochs", str(args.epochs)]
    split = work / "split"
    if not split.exists():
        subprocess.run([sys.executable, *common, str(split), *options, "--stages", "labels", "split"], check=True,
                       capture_output=True)
    train = len(pd.read_csv(next((split / "splits").glob("*/split-0/train.tsv")), sep="\t"))
    validation = len(pd.read_csv(next((split / "splits").glob("*/split-0/validation.tsv")), sep="\t"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    variants = {
        "1 process": [sys.executable],
        "2 processes (torchrun)": torchrun,
        "2 processes, --sync_batchnorm": torchrun,
    }
    rows, shape = [], "?"
    for name, launcher in variants.items():
        out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run(["cp", "-r", str(split), str(out)], check=True)
        extra = ["--sync_batchnorm"] if "sync" in name else []
        start = time.perf_counter()
        done = subprocess.run([*launcher, *common, str(out), *options, "--stages", "train", "--split", "0", *extra],
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            rows.append([name, f"failed ({done.stderr.strip().splitlines()[-1]})", "", "", ""])
            continue
        (maps,) = (out / "maps").iterdir()
        shape = "x".join(map(str, json.loads((maps / "maps.json").read_text())["input_size"][1:]))
        log = pd.read_csv(maps / "split-0" / "training_logs" / "training.tsv", sep="\t")
        rows.append([name, f"{log.images_per_second.mean():.2f}", f"{log.evaluation_seconds.mean():.1f}",
                     f"{seconds / args.epochs:.1f}", " / ".join(f"{v:.2f}" for v in log.BA_validation)])
    print(f"Machine: {machine()}")
    print(f"Inputs: {args.n_subjects} trivial subjects from {args.source_caps} ({shape}), fold 0: {train} training "
          f"and {validation} validation images, Conv5_FC3, global batch 4, {args.epochs} epochs")
    print()
    header = ["variant", "train img/s", "evaluation s", "wall s/epoch (start-up included)", "validation BA per epoch"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
