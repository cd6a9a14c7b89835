"""The MAPS folder (ClinicaDL 1.x layout, defects fixed): every path in it, and nothing else.

maps/<experiment>/ (or search/<study>/trial-<number>/, one per search trial)
  maps.json, environment.txt
  groups/train+validation.tsv                 every session any model of this MAPS (or its transfer
                                              source) was trained or selected on, with fingerprints
  groups/<group>/[split-N/]{data.tsv,maps.json}
  groups/train/split-N/fitted_on.tsv         every session whose data fitted that fold's weights: its training
                                              sessions and, through transfer, what the source's model was fitted on
  split-N/training_logs/[network-P/]{training.tsv,tensorboard/}
  split-N/tmp/[network-P/]checkpoint.pth.tar  only while training runs or after a crash
  split-N/best-<metric>/model.pth.tar, or network-P_model.pth.tar per network (ClinicaDL 1.6.1's names)
  split-N/best-<metric>/<group>/<group>_<level>_level_{prediction,metrics}.tsv, description.log
  split-N/best-<metric>/validation/vote_weights.json   part weights, in an exported MAPS (no predictions)
  model_card.md, report.html
  export.json                                 an unpacked archive's record: what it holds, each file's SHA-256
  reproduction.{json,md}                      a MAPS made by --reproduce: how it compares with the original
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

from clinicadl_app import __version__
from clinicadl_app.layouts.output import container

TRAIN_VALIDATION = "train+validation"


class Maps:
    def __init__(self, root: Path):
        self.root = root

    @property
    def output_dir(self) -> Path:
        """The OUTPUT_DIR a MAPS lives in (OUTPUT_DIR/maps/<experiment>, or OUTPUT_DIR/search/<study>/trial-N):
        paths inside it are recorded relative to it, so a moved output folder, or one made in a container,
        still works."""
        from clinicadl_app.layouts.search import SEARCH_DIR

        return self.root.parents[2] if self.root.parent.parent.name == SEARCH_DIR else self.root.parent.parent

    def relative(self, path: Path) -> str:
        """How a path is written in this MAPS's records: relative to OUTPUT_DIR when inside it."""
        resolved = Path(path).resolve()
        try:
            return str(resolved.relative_to(self.output_dir.resolve()))
        except ValueError:
            return str(resolved)

    def recorded(self, value: str) -> Path:
        """A path as written in this MAPS's records, as a path on this machine."""
        path = Path(value)
        return path if path.is_absolute() else self.output_dir / path

    def trained_on(self, record: dict) -> list[Path]:
        """The CAPS and BIDS folders the models were trained from: images from these are the same dataset."""
        return [self.recorded(record[key]) for key in ("caps_directory", "bids_directory") if record.get(key)]

    def resolve(self, recorded: str, what: str) -> Path:
        """A recorded path as a path on this machine; a missing one is a clear error, never a traceback."""
        path = self.recorded(recorded)
        if not path.exists():
            from clinicadl_app.core.errors import MissingInputError

            raise MissingInputError(f"{self.record}: the {what} it was made from, {path}, is not there; put it back "
                                    "(paths inside OUTPUT_DIR are relative to it) or pass the folder explicitly")
        return path

    @property
    def record(self) -> Path:
        return self.root / "maps.json"

    @property
    def environment(self) -> Path:
        return self.root / "environment.txt"

    @property
    def model_card(self) -> Path:
        return self.root / "model_card.md"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def export_record(self) -> Path:
        return self.root / "export.json"

    @property
    def reproduction(self) -> Path:
        return self.root / "reproduction.json"

    @property
    def reproduction_summary(self) -> Path:
        return self.root / "reproduction.md"

    @property
    def seen(self) -> Path:
        """Sessions used for training or model selection, including transfer sources'."""
        return self.root / "groups" / f"{TRAIN_VALIDATION}.tsv"

    @property
    def seen_signatures(self) -> Path:
        """Image signatures of the sessions in train+validation.tsv (fingerprint.py)."""
        return self.root / "groups" / f"{TRAIN_VALIDATION}_signatures.npz"

    def group_dir(self, group: str, fold: int | None = None) -> Path:
        folder = self.root / "groups" / group
        return folder if fold is None else folder / f"split-{fold}"

    def group_data(self, group: str, fold: int | None = None) -> Path:
        return self.group_dir(group, fold) / "data.tsv"

    def group_record(self, group: str, fold: int | None = None) -> Path:
        return self.group_dir(group, fold) / "maps.json"

    def fitted_on(self, fold: int) -> Path:
        """Sessions that fitted fold `fold`'s weights, transfer sources' included (a subset of `seen`)."""
        return self.group_dir("train", fold) / "fitted_on.tsv"

    def groups(self) -> list[str]:
        base = self.root / "groups"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"split-{fold}"

    def folds(self) -> list[int]:
        return sorted(int(p.name[6:]) for p in self.root.glob("split-*") if p.name[6:].isdigit())

    def trained(self, fold: int, metrics: list[str] | tuple[str, ...] | None = None) -> bool:
        """Whether this fold's training ended with its results: tmp/ (the checkpoint) goes last, so a fold
        killed mid-way, whose best-<metric> models are only the best so far, still has it."""
        metrics = self.selection_metrics(fold) if metrics is None else metrics
        return (not self.tmp_dir(fold).exists() and self.training_log(fold).parent.exists() and bool(metrics)
                and all(self.model(fold, m, n).exists() for m in metrics for n in self.networks(fold, m))
                and all(self.metrics(fold, m, "validation", "image").exists() for m in metrics))

    @staticmethod
    def _network(network: int | None) -> str:
        return "" if network is None else f"network-{network}"

    def training_log(self, fold: int, network: int | None = None) -> Path:
        return self.fold_dir(fold) / "training_logs" / self._network(network) / "training.tsv"

    def tensorboard(self, fold: int, network: int | None = None) -> Path:
        return self.fold_dir(fold) / "training_logs" / self._network(network) / "tensorboard"

    def fold_environment(self, fold: int) -> Path:
        return self.fold_dir(fold) / "training_logs" / "environment.txt"

    def checkpoint(self, fold: int, network: int | None = None) -> Path:
        return self.fold_dir(fold) / "tmp" / self._network(network) / "checkpoint.pth.tar"

    def tmp_dir(self, fold: int) -> Path:
        return self.fold_dir(fold) / "tmp"

    def model(self, fold: int, metric: str, network: int | None = None) -> Path:
        name = "model.pth.tar" if network is None else f"network-{network}_model.pth.tar"
        return self.fold_dir(fold) / f"best-{metric}" / name

    def selection_metrics(self, fold: int) -> list[str]:
        return sorted(p.name[5:] for p in self.fold_dir(fold).glob("best-*") if p.is_dir())

    def networks(self, fold: int, metric: str) -> list[int | None]:
        folder = self.fold_dir(fold) / f"best-{metric}"
        found = sorted(int(p.name[8:-14]) for p in folder.glob("network-*_model.pth.tar") if p.name[8:-14].isdigit())
        return found or [None]

    def result_dir(self, fold: int, metric: str, group: str) -> Path:
        return self.fold_dir(fold) / f"best-{metric}" / group

    def prediction(self, fold: int, metric: str, group: str, level: str) -> Path:
        return self.result_dir(fold, metric, group) / f"{group}_{level}_level_prediction.tsv"

    def metrics(self, fold: int, metric: str, group: str, level: str) -> Path:
        return self.result_dir(fold, metric, group) / f"{group}_{level}_level_metrics.tsv"

    def vote_weights(self, fold: int, metric: str) -> Path:
        """Part weights carried by an exported MAPS instead of the validation predictions they come from."""
        return self.result_dir(fold, metric, "validation") / "vote_weights.json"

    def description(self, fold: int, metric: str, group: str) -> Path:
        return self.result_dir(fold, metric, group) / "description.log"

    def interpretation(self, fold: int, metric: str, group: str, name: str) -> Path:
        return self.result_dir(fold, metric, group) / f"interpret-{name}"


def environment_text(command: list[str] | None = None) -> str:
    """Everything about the software and hardware that could change a result."""
    import torch  # here, not at the top: the labels and split stages read this module and need no torch

    lines = [f"clinicadl-app {__version__}", f"python {sys.version.split()[0]} ({platform.python_implementation()})",
             f"platform {platform.platform()}", f"machine {platform.node()}", f"cpu {_cpu_model()}",
             f"cpus available {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}",
             f"torch {torch.__version__}", f"torch threads {torch.get_num_threads()}",
             f"cuda {torch.version.cuda or 'none'}",
             f"cudnn {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}"]
    if torch.cuda.is_available():
        lines += [f"gpu {i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        lines.append("gpu none")
    from clinicadl_app.core.allocator import preloaded

    lines.append(f"allocator {preloaded() or 'glibc'}")
    image = container()
    lines.append(f"container {image['Type']} {image['Tag']}" if image else "container none")
    if command:
        lines.append("command " + " ".join(command))
    lines.append("packages:")
    lines += [f"  {p}" for p in _packages()]
    return "\n".join(lines) + "\n"


@functools.cache
def _packages() -> tuple[str, ...]:
    """name==version of every installed distribution; each one's metadata is parsed once per process (reading
    d.metadata and d.version parsed it three times: 0.3 s per call, paid by every fold)."""
    found = set()
    for distribution in distributions():
        metadata = distribution.metadata
        if metadata["Name"]:
            found.add(f"{metadata['Name']}=={metadata['Version']}")
    return tuple(sorted(found, key=str.lower))


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return platform.processor() or "unknown"
