"""Data-parallel training on this machine's CPUs (gloo, 2 processes, 2 mm brains): torchrun's processes train as
one process with the whole batch would; only the main one writes; a dead process stops every process with one
line; a checkpoint written by 2 processes resumes on 1; the thread count follows the allocation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clinicadl_app.core import cpus
from clinicadl_app.core.config import Execution
from clinicadl_app.core.errors import ExitCode
from clinicadl_app.generate import TRIVIAL_SPLIT, Trivial, generate_trivial
from clinicadl_app.layouts.caps import Caps

from .conftest import CAPS2MM, PYTHON_WARNING, ROOT, run_app

pytestmark = pytest.mark.slow

EXPERIMENT = TRIVIAL_SPLIT + """
[train]
mode = "image"
architecture = "Conv5_FC3"
epochs = 1
batch_size = 4
dropout = 0.0
optimizer = "SGD"
learning_rate = 0.01
deterministic = true
memory_layout = "contiguous"
"""
"""Contiguous layout: this CPU's channels-last float32 kernels (BatchNorm's backward above all) give gradients a
few per cent off the float64 ones, by an amount that depends on the batch each process holds. SGD, not Adam:
Adam scales every update to about the learning rate whatever the gradient, so it would turn the
float noise of gradients that should be zero (a convolution's bias before BatchNorm) into visible differences."""
TRAIN = ("--stages", "train", "--split", "0")


def _dataset(tmp_path_factory, downsample: int) -> Path:
    """28 subjects: fold 0 trains on 10, an even number, so two processes split every batch without padding."""
    root = tmp_path_factory.mktemp(f"distributed{2 * downsample}mm")
    generate_trivial(Caps(CAPS2MM), root, Trivial(n_subjects=28, seed=0, downsample=downsample))
    (root / "experiment.toml").write_text(EXPERIMENT)
    split = run_app(root / "bids", root / "split", "group", "--caps_dir", root / "caps", "--config",
                    root / "experiment.toml", "--stages", "labels", "split", check=True)
    assert split.returncode == 0
    train = pd.read_csv(next((root / "split" / "splits").glob("*/split-0/train.tsv")), sep="\t")
    assert len(train) % 2 == 0, "the test needs an even training set"
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def dataset4(tmp_path_factory) -> Path:
    """The same subjects at 4 mm, for what processes do when one dies (not for gradients): an eighth of the
    compute per epoch, so the run has more epochs for the kill to land in."""
    return _dataset(tmp_path_factory, 2)


def _copy_split(dataset: Path, out: Path) -> Path:
    shutil.copytree(dataset / "split", out)
    return out


def _arguments(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "run.py"), str(dataset / "bids"), str(out), "group", "--caps_dir", str(dataset / "caps"),
            "--config", str(dataset / "experiment.toml"), *TRAIN, *extra]


def torchrun(dataset: Path, out: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    """torchrun, each process's output kept apart (torchrun itself prints its own report when one fails)."""
    logs = out.parent / f"{out.name}-torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "--log_dir", str(logs), "--redirects", "3", *_arguments(dataset, out, *extra)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    done.stderr = "".join(path.read_text() for path in sorted(logs.rglob("stderr.log")))
    noise = PYTHON_WARNING.findall(done.stderr)
    assert not noise, f"a Python warning reached the user's terminal: {noise}"
    return done


def _maps(out: Path) -> Path:
    (maps,) = (out / "maps").iterdir()
    return maps


def _weights(out: Path, selection: str = "loss") -> dict[str, torch.Tensor]:
    return torch.load(_maps(out) / "split-0" / f"best-{selection}" / "model.pth.tar", weights_only=True)["model"]


def _initial(dataset: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The weights every run starts from: the same seed builds them, DDP broadcasts the main process's."""
    from clinicadl_app.core.config import Train
    from clinicadl_app.group.models import build_model
    from clinicadl_app.group.tasks import make_task

    torch.manual_seed(0)  # Trainer seeds (seed * 1000 + fold * 100 + network) = 0 for fold 0
    train = pd.read_csv(next((dataset / "split" / "splits").glob("*/split-0/train.tsv")), sep="\t")
    task = make_task("classification", train, "diagnosis", "", False, ["AD", "CN"])
    return build_model(Train(dropout=0.0), (1, 84, 104, 90), task).state_dict()


def _update_difference(a: dict, b: dict, start: dict) -> float:
    """|update_a - update_b| / |update_a| over every weight (not the BatchNorm statistics)."""
    keys = [k for k in start if start[k].is_floating_point() and "running" not in k]
    da = torch.cat([(a[k] - start[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - start[k]).flatten() for k in keys])
    return float((da - db).norm() / da.norm())


def test_two_processes_with_sync_batchnorm_train_as_one_process_with_the_whole_batch(dataset, tmp_path):
    single = run_app(*_arguments(dataset, _copy_split(dataset, tmp_path / "one"), "--n_cpus", "1")[1:])
    assert single.returncode == 0, single.stderr
    synced = torchrun(dataset, _copy_split(dataset, tmp_path / "sync"), "--sync_batchnorm")
    assert synced.returncode == 0, synced.stderr
    local = torchrun(dataset, _copy_split(dataset, tmp_path / "local"), "--stages", "train", "predict")
    assert local.returncode == 0, local.stderr
    # predict runs in the main process alone, on the threads the ended process leaves
    assert f"the next stages run in this one on {cpus.allocated_cpus()} thread(s)" in local.stderr, local.stderr
    assert local.stderr.count("predict split-0 best-loss on test") == 1

    start = _initial(dataset, tmp_path)
    one, sync, apart = _weights(tmp_path / "one"), _weights(tmp_path / "sync"), _weights(tmp_path / "local")
    assert _update_difference(one, start, start) > 0, "training moved the weights"
    synced_gap, local_gap = _update_difference(one, sync, start), _update_difference(one, apart, start)
    # float32 gradients of these 3D convolutions are ~1 % off float64 (sums over millions of voxels), and the
    # sums are split differently between one batch of 4 and two of 2: measured 0.07-2 % of the update
    assert synced_gap < 0.05, synced_gap
    assert local_gap > 5 * synced_gap, "without sync BatchNorm each process normalises its 2 inputs alone"

    logs = {name: pd.read_csv(_maps(tmp_path / name) / "split-0" / "training_logs" / "training.tsv", sep="\t")
            for name in ("one", "sync")}
    assert len(logs["sync"]) == len(logs["one"]) == 1, "the main process alone writes the training log"
    assert logs["sync"].BA_validation.iloc[0] == logs["one"].BA_validation.iloc[0]
    assert logs["sync"].loss_validation.iloc[0] == pytest.approx(logs["one"].loss_validation.iloc[0], rel=0.02)
    assert logs["sync"].loss_train.iloc[0] == pytest.approx(logs["one"].loss_train.iloc[0], rel=0.02), \
        "the training loss is the mean over both processes' inputs"

    maps = _maps(tmp_path / "sync")
    assert json.loads((maps / "maps.json").read_text())["processes"] == 2
    assert len(list((maps / "split-0" / "training_logs" / "tensorboard").iterdir())) == 1
    assert len(list((tmp_path / "sync" / "logs").glob("group-*.log"))) == 2, "the split's run and one training run"
    assert not [p for p in (tmp_path / "sync").rglob("*") if ".tmp-" in p.name]
    assert synced.stderr.count("epoch 0 step") == 1, "the other process logs warnings only"
    # the models load into the plain network predict builds (a BatchNorm state dict)
    assert set(sync) == set(one)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


KILLED_EPOCHS = 20
"""4 mm epochs are short: a second after the first checkpoint, a 20-epoch run is still mid-run."""


def test_a_killed_process_stops_every_process_with_one_line_and_one_process_resumes(dataset4, tmp_path):
    """Started as srun starts tasks (SLURM variables and MASTER_ADDR), the second process is killed mid-run."""
    out = _copy_split(dataset4, tmp_path / "out")
    port = str(_free_port())
    jobs = []
    for rank in (0, 1):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        jobs.append(subprocess.Popen([sys.executable, *_arguments(dataset4, out, "--epochs", str(KILLED_EPOCHS), "--sync_batchnorm")],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("maps/*/split-0/tmp/checkpoint.pth.tar")):
        assert jobs[0].poll() is None, jobs[0].communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # into the next epoch
    jobs[1].send_signal(signal.SIGKILL)
    _, stderr = jobs[0].communicate(timeout=300)
    jobs[1].wait()
    assert jobs[0].returncode == ExitCode.PEER_LOST, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("clinicadl-app: error:")]
    assert len(errors) == 1 and "rank 0 of 2" in errors[0] and "resume" in errors[0], stderr
    assert "Traceback" not in stderr
    assert list(out.glob("maps/*/split-0/tmp/checkpoint.pth.tar")), "the fold is left to resume"

    resumed = run_app(*_arguments(dataset4, out, "--epochs", str(KILLED_EPOCHS), "--sync_batchnorm")[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    log = pd.read_csv(_maps(out) / "split-0" / "training_logs" / "training.tsv", sep="\t")
    assert log.epoch.tolist() == list(range(KILLED_EPOCHS)), "the epochs of both runs, each once"
    assert (_maps(out) / "split-0" / "best-loss" / "model.pth.tar").exists()
    assert not list(out.glob("maps/*/split-0/tmp"))


def test_a_batch_that_does_not_divide_among_the_processes_is_refused_in_one_line(dataset, tmp_path):
    """Each process checks before it starts anything; torchrun may stop the slower one before it gets there."""
    done = torchrun(dataset, _copy_split(dataset, tmp_path / "out"), "--batch_size", "3")
    assert done.returncode != 0
    refusal = ("clinicadl-app: error: --batch_size 3 is the global batch, shared by 2 processes: make it a "
               "multiple of 2")
    per_process = [path.read_text().splitlines() for path in sorted((tmp_path / "out-torchrun").rglob("stderr.log"))]
    assert len(per_process) == 2 and [refusal] in per_process, done.stderr
    assert all(lines in ([refusal], []) for lines in per_process), done.stderr
    search = torchrun(dataset, tmp_path / "search", "--stages", "search")
    assert "not under torchrun" in search.stderr


def test_threads_follow_the_allocation_not_the_node(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(cpus, "_affinity", lambda: 64)
    (tmp_path / "cpu.max").write_text("300000 100000\n")  # a container run with --cpus 3
    read_quota = cpus._cgroup_quota
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: read_quota(tmp_path))
    assert cpus.allocated_cpus() == 3
    assert cpus.allocated_cpus(processes_on_node=2) == 1, "torchrun's processes share the allocation"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    execution = Execution()
    assert (execution.cpus, execution.cpus_alone) == (1, 3), "after training, the main process takes the rest"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert cpus.allocated_cpus(processes_on_node=4) == 2, "SLURM gives each task its own CPUs"
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert cpus.allocated_cpus() == 64


def test_sync_batchnorm_gives_the_gradients_of_the_whole_batch(tmp_path):
    """Two gloo processes, each with half a batch, against one process with all of it (float64: exact)."""
    script = tmp_path / "check.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, {str(ROOT)!r})
from clinicadl_app.group.sync_batchnorm import convert
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
torch.manual_seed(0)
x = torch.randn(6, 3, 5, 6, 7, dtype=torch.float64) * 3 + 1
reference = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 60, 2)).double()
model = convert(nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 60, 2)))
model.double().load_state_dict(reference.state_dict())
ddp = nn.parallel.DistributedDataParallel(model)
ddp(x[rank::2]).square().mean().backward()
reference(x).square().mean().backward()
gap = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
stats = (model[1].running_var - reference[1].running_var).abs().max().item()
print(f"GAP {{gap:.3e}} {{stats:.3e}}")
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, str(script), str(rank)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for job in jobs:
        stdout, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr
        gap, stats = (float(v) for v in stdout.split("GAP ")[1].split())
        assert gap < 1e-10 and stats < 1e-12, stdout
