"""The GPU path in one short call (a few minutes on one GPU): what the CPU-only test suite cannot reach.

    python benchmarks/gpu_check.py [--work /tmp/gpu-check]

1. A group run (labels, split, 2 epochs of training, predict) on 2 mm brains with --amp: it trains on cuda
   (its training pass's images per second, from training.tsv), and predicting twice gives identical
   probabilities (eval mode on the GPU).
2. One Conv5_FC3 training step on 169x208x179 images, batch 8: float32, float16 and bfloat16 autocast,
   contiguous and channels-last, cudnn.benchmark on: images per second and peak GPU memory.
3. Integrated gradients of one 169x208x179 image on cuda, its 16 steps one at a time and 8 at a time (the
   batched path the CPU never takes): seconds each, and the same map.
4. With 2 GPUs or more: torchrun --nproc_per_node 2 --sync_batchnorm (NCCL) trains and writes one MAPS.
Prints a table and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clinicadl_app.generate import TRIVIAL_SPLIT  # noqa: E402

CONFIG = TRIVIAL_SPLIT + """
[train]
epochs = 2
batch_size = 4
"""


def step_speed(dtype: torch.dtype | None, channels_last: bool, batch: int = 8) -> tuple[float, float]:
    from clinicadl_app.group.networks.cnn import conv5_fc3

    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = conv5_fc3((1, 169, 208, 179), 2).cuda().to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = torch.rand(batch, 1, 169, 208, 179, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for step in range(13):
        if step == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return 10 * batch / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def integrated_gradients() -> tuple[float, float, bool]:
    from clinicadl_app.group.attribution import attribute
    from clinicadl_app.group.networks.cnn import conv5_fc3

    torch.manual_seed(0)
    model = conv5_fc3((1, 169, 208, 179), 2).cuda().eval()
    x = torch.rand(1, 1, 169, 208, 179, device="cuda")
    seconds, maps = [], []
    for batch in (1, 8, 1, 8):  # the first two warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        maps.append(attribute(model, "integrated-gradients", x, target=1, layer=0, batch=batch))
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    same = torch.allclose(maps[2], maps[3], rtol=1e-3, atol=1e-6)
    return seconds[2], seconds[3], same


def app(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], capture_output=True, text=True,
                          check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    work = parser.parse_args().work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    from clinicadl_app.generate import Trivial, generate_trivial
    from clinicadl_app.layouts.caps import Caps

    rows, failed = [], False
    data = work / "data"
    generate_trivial(Caps(ROOT / "tests" / "data" / "caps2mm"), data, Trivial(n_subjects=28, seed=0))
    (data / "experiment.toml").write_text(CONFIG)
    group = [data / "bids", work / "out", "group", "--caps_dir", data / "caps", "--config", data / "experiment.toml"]
    trained = app(*group, "--stages", "labels", "split", "train", "predict", "--amp")
    ok = trained.returncode == 0 and "on cuda" in trained.stderr
    rows.append(["group run on cuda with --amp", "ok" if ok else trained.stderr[-300:]])
    failed |= not ok
    if ok:
        (maps,) = (work / "out" / "maps").iterdir()
        logs = [pd.read_csv(t, sep="\t") for t in sorted(maps.glob("split-*/training_logs/training.tsv"))]
        rows.append(["the run's training pass (2 mm, batch 4, --amp)",
                     " ".join(f"{log.images_per_second.mean():.0f}" for log in logs) + " img/s per split"])
        tables = sorted(maps.glob("split-*/best-*/test/test_image_level_prediction.tsv"))
        first = [pd.read_csv(t, sep="\t") for t in tables]
        again = app(*group, "--stages", "predict", "--amp")
        same = again.returncode == 0 and all(
            a.equals(pd.read_csv(t, sep="\t")) for a, t in zip(first, tables, strict=True))
        rows.append(["predict twice: identical probabilities", "ok" if same else "DIFFERENT"])
        failed |= not same
    for dtype in (None, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            speed, memory = step_speed(dtype, channels_last)
            rows.append([f"Conv5_FC3 step, {dtype or 'float32'}, {'channels-last' if channels_last else 'contiguous'}",
                         f"{speed:.1f} img/s, {memory:.1f} GiB"])
    alone, batched, same = integrated_gradients()
    rows.append(["integrated gradients, 1 mm, steps 1 / 8 at a time",
                 f"{alone:.2f} s / {batched:.2f} s, {'same map' if same else 'DIFFERENT MAPS'}"])
    failed |= not same
    if torch.cuda.device_count() >= 2:
        out = work / "ddp"
        subprocess.run(["cp", "-r", str(work / "out"), str(out)], check=True)
        ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "run.py"), str(group[0]), str(out), *map(str, group[2:]),
                              "--stages", "train", "--overwrite", "--sync_batchnorm"],
                             capture_output=True, text=True, check=False)
        result = "ok" if ddp.returncode == 0 else ddp.stderr[-300:]
        rows.append(["torchrun 2 processes, NCCL, --sync_batchnorm", result])
        failed |= ddp.returncode != 0
    print(f"GPU: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    print(table(["check", "result"], rows))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
