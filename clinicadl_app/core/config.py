"""Settings as typed, frozen sections; one definition serves the command line, the TOML file and the record.

Each section is a TOML table of the same name. Values come from the defaults here, then the file
given with --config, then the command line (config_file.py merges them); the effective result is saved
beside the outputs (logs/config-*.toml) and can be given back to --config to rerun.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w

from clinicadl_app.core.cpus import allocated_cpus, processes_on_node

Mode = Literal["image", "patch", "roi", "slice"]
MODES: tuple[str, ...] = typing.get_args(Mode)
Stage = Literal["labels", "split", "search", "train", "predict", "interpret", "report", "export"]
Augmentation = Literal["Noise", "Erasing", "CropPad", "Smoothing", "Motion", "Ghosting", "Spike", "BiasField",
                       "Flip"]
STAGES: tuple[str, ...] = ("labels", "split", "train", "predict", "interpret", "report")
"""The default run; search and export are asked for by name."""


def option(default: Any, help: str, *, flags: tuple[str, ...] = (), metavar: str | None = None) -> Any:
    """A dataclass field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, "flags": flags, "metavar": metavar})


@dataclass(frozen=True)
class Execution:
    """How and on what to run; nothing here changes a result but the choice of images (which the split records)."""

    participant_label: tuple[str, ...] = option((), "participants to process (with or without 'sub-'); default all;"
        " at the group level, the images to label (so to split and train on) and to predict", metavar="LABEL")
    session_label: tuple[str, ...] = option((), "sessions to process (with or without 'ses-'); default all; at the "
                                            "group level as --participant_label", metavar="LABEL")
    bids_filter_file: Path | None = option(
        None, 'JSON file of BIDS entities narrowing the T1w query, as fMRIPrep: {"t1w": {"acquisition": "mprage"}}'
    )
    skip_bids_validator: bool = option(False, "do not run the BIDS validator on BIDS_DIR")
    n_cpus: int = option(0, "CPUs to use (0: the allocation: affinity, cgroup quota, SLURM_CPUS_PER_TASK, "
                         "shared by torchrun's processes on the node)", flags=("--nprocs", "--nthreads"))
    work_dir: Path | None = option(None, "folder for temporary files (default: a temporary folder)", flags=("-w",))
    caps_dir: Path | None = option(
        None, "CAPS to read t1-linear images from and write tensors to (default: OUTPUT_DIR/caps)"
    )
    overwrite: bool = option(False, "redo what is complete: sessions (participant level), folds (group level)")
    stages: tuple[Stage, ...] = option(STAGES, "group level: the stages to run, in this order (search: "
                                       "see [search]; export: see [export])", metavar="STAGE")
    reproduce: Path | None = option(
        None, "group level: a MAPS (or an exported archive) to reproduce: labels, split and training run again from "
        "what it recorded, into <experiment>-reproduced, and reproduction.md compares the two", metavar="MAPS_DIR")
    verbose: bool = option(False, "log debugging details")
    quiet: bool = option(False, "log warnings and errors only")

    def __post_init__(self) -> None:
        if self.n_cpus < 0:
            raise ValueError("--n_cpus must be 0 (all) or a positive number")
        if self.verbose and self.quiet:
            raise ValueError("--verbose and --quiet cannot be used together")

    @property
    def cpus(self) -> int:
        return self.n_cpus or allocated_cpus(processes_on_node())

    @property
    def cpus_alone(self) -> int:
        """Once torchrun's other processes on this node have ended (predict, interpret, report)."""
        return self.n_cpus or allocated_cpus()


@dataclass(frozen=True)
class Preprocessing:
    """t1-linear: N4 bias correction, affine registration to MNI152NLin2009cSym, crop to 169x208x179."""

    uncropped_image: bool = option(False, "also keep the uncropped 193x229x193 image in the CAPS")
    qc_threshold: float = option(
        0.3, "minimum correlation with the template in the brain for an image to pass the quality check"
    )
    seed: int = option(0, "seed of the registration's random sampling")

    def __post_init__(self) -> None:
        if not -1.0 <= self.qc_threshold <= 1.0:
            raise ValueError("--qc_threshold is a correlation: it must lie between -1 and 1")


@dataclass(frozen=True)
class Extraction:
    """Tensors cut out of the preprocessed images, as ClinicaDL's prepare-data writes them."""

    modes: tuple[Mode, ...] = option(("image",), "tensor modes to extract", metavar="MODE")
    use_uncropped_image: bool = option(False, "extract from the uncropped image (needs --uncropped_image)")
    patch_size: int = option(50, "patch side in voxels (patch mode)")
    stride_size: int = option(50, "distance between patches in voxels (patch mode)")
    slice_direction: Literal[0, 1, 2] = option(0, "slice axis: 0 sagittal, 1 coronal, 2 axial (slice mode)")
    slice_mode: Literal["rgb", "single"] = option("rgb", "rgb: 3 identical channels; single: 1 channel")
    discarded_slices: tuple[int, ...] = option(
        (20,), "slices dropped at the start and end of the axis: one number, or two (start end)"
    )
    roi_list: tuple[str, ...] = option(
        ("leftHippocampusBox", "rightHippocampusBox"),
        "regions to extract (roi mode): built-in leftHippocampus, rightHippocampus, leftHippocampusBox, "
        "rightHippocampusBox, or the name of a --roi_masks file",
        metavar="ROI",
    )
    roi_masks: tuple[Path, ...] = option(
        (), "user masks on the MNI152NLin2009cSym 1 mm grid, named *_roi-<name>_mask.nii.gz", metavar="FILE"
    )
    roi_uncrop_output: bool = option(False, "keep ROI tensors at image size instead of the mask's bounding box")

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("--modes needs at least one of " + ", ".join(MODES))
        if self.patch_size < 1 or self.stride_size < 1:
            raise ValueError("--patch_size and --stride_size must be positive")
        if not 1 <= len(self.discarded_slices) <= 2 or min(self.discarded_slices) < 0:
            raise ValueError("--discarded_slices takes one or two non-negative numbers")
        if "roi" in self.modes and not self.roi_list:
            raise ValueError("roi mode needs --roi_list")

    @property
    def discard(self) -> tuple[int, int]:
        return self.discarded_slices[0], self.discarded_slices[-1]


@dataclass(frozen=True)
class Labels:
    """The label: any column of participants.tsv or sessions.tsv."""

    column: str = option("", "column to predict (participants.tsv or sub-X_sessions.tsv)")
    task: Literal["classification", "regression"] = option("classification", "what the label is")
    values: tuple[str, ...] = option((), "classification: the classes to keep (default: every value)", metavar="VALUE")
    subgroups: tuple[str, ...] = option(
        (), "classes nested in a parent class, as PARENT=CHILD1,CHILD2 (e.g. MCI=sMCI,pMCI): split first",
        metavar="PARENT=CHILDREN",
    )
    name: str = option("", "name of the splits folder (default: the column and the classes)")
    keep_failed_qc: bool = option(False, "keep images whose t1-linear registration failed the quality check "
                                  "(by default they are dropped, with their correlation, in dropped.tsv)")
    age_column: str = option("age", "column holding age, used to balance the splits")
    sex_column: str = option("sex", "column holding sex, used to balance the splits")

    def __post_init__(self) -> None:
        if self.name and not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("--name may contain only letters, digits, '-' and '_'")
        if self.task == "regression" and self.values:
            raise ValueError("--values only applies to classification")
        if "/" in self.folder or "\\" in self.folder or self.folder.startswith("."):  # --name is checked above
            raise ValueError(f"the column and classes make the folder name '{self.folder}', which is not one "
                             "folder: give the splits a --name (letters, digits, '-' and '_')")

    @property
    def folder(self) -> str:
        if self.name:
            return self.name
        return "_".join([self.column, *self.values]) if self.values else self.column


@dataclass(frozen=True)
class Split:
    """Subject-level test set and folds, stratified and balanced on age and sex."""

    n_test: float = option(0.2, "test subjects: a fraction (< 1) or a count")
    n_splits: int = option(5, "folds on the remaining subjects; 0 for one train/validation split")
    n_validation: float = option(0.2, "with n_splits = 0: validation subjects, a fraction or a count")
    seed: int = option(0, "seed of the split search; the same seed gives the same split")
    p_age: float = option(0.80, "minimum p-value of the age comparison between sets (t-test, per class)")
    p_sex: float = option(0.80, "minimum p-value of the sex comparison between sets (Fisher exact, per class)")
    max_attempts: int = option(1000, "draws tried before keeping the best split found")
    bins: int = option(5, "regression: label quantile bins used to stratify")
    baseline_sets: bool = option(False, "also write *_baseline.tsv sets holding each subject's first session")

    def __post_init__(self) -> None:
        if self.n_test < 0 or self.n_validation <= 0:
            raise ValueError("--n_test must be >= 0 and --n_validation > 0")
        for name, amount in (("n_test", self.n_test), ("n_validation", self.n_validation)):
            if amount >= 1 and amount != int(amount):  # 1.5: neither a fraction nor a count of subjects
                raise ValueError(f"--{name} {amount:g}: give a fraction below 1 or a whole number of subjects")
        if self.n_splits == 1 or self.n_splits < 0:
            raise ValueError("--n_splits must be 0 (one validation split) or at least 2")
        if not (0 <= self.p_age <= 1 and 0 <= self.p_sex <= 1):
            raise ValueError("--p_age and --p_sex are p-values between 0 and 1")
        if self.max_attempts < 1 or self.bins < 1:
            raise ValueError("--max_attempts and --bins must be positive")


@dataclass(frozen=True)
class Train:
    """Networks trained on the folds of the split, recorded in a MAPS (OUTPUT_DIR/maps/<experiment>)."""

    experiment: str = option("", "MAPS name (default: <labels folder>_<mode>_<architecture>)")
    network_task: Literal["", "classification", "regression", "reconstruction"] = option(
        "", "what the network does (default: the [labels] task)")
    classes: tuple[str, ...] = option(
        (), "classification: classes to train on (default: [labels] values); a parent class stands for its "
        "subgroups, so [\"CN\", \"MCI\"] trains CN against MCI, sMCI and pMCI together", metavar="CLASS")
    mode: Mode = option("image", "what one network input is: the image, or patches, ROIs or slices of it")
    architecture: str = option("Conv5_FC3", "Conv5_FC3, Conv4_FC3, Stride_Conv5_FC3, resnet18 (slices) or "
                               "package.module:function")
    multi_network: bool = option(False, "one network per part (patch, ROI or slice position)")
    dropout: float = option(0.5, "dropout before the fully connected layers")
    pretrained_weights: Path | None = option(None, "resnet18: a state dict to start from (no download)")
    epochs: int = option(20, "maximum number of epochs")
    batch_size: int = option(8, "inputs per batch: the global batch, shared by data-parallel processes (torchrun)")
    learning_rate: float = option(1e-4, "learning rate")
    weight_decay: float = option(1e-4, "weight decay")
    optimizer: Literal["Adam", "AdamW", "SGD"] = option("Adam", "optimiser")
    accumulation_steps: int = option(1, "batches whose gradients are summed before each update")
    evaluation_steps: int = option(0, "also evaluate every N updates inside an epoch (0: once per epoch)")
    selection_metrics: tuple[str, ...] = option(
        (), "metrics whose best value selects a model, one best-<metric> folder each "
        "(default: loss and BA for classification, loss otherwise)", metavar="METRIC")
    patience: int = option(0, "stop after this many evaluations without improvement of the loss (0: never)")
    tolerance: float = option(0.0, "smallest loss decrease counted as an improvement")
    loss: Literal["", "CrossEntropyLoss", "MSELoss", "L1Loss", "HuberLoss"] = option(
        "", "loss (default: CrossEntropyLoss for classification, MSELoss otherwise)")
    class_weights: bool = option(False, "classification: weight the loss by inverse class frequency")
    normalize: bool = option(True, "min-max normalise to [0, 1] with the whole image's range, parts included "
                             "(ClinicaDL 1.6.1 normalises each patch, slice or ROI on its own range)")
    data_augmentation: tuple[Augmentation, ...] = option((), "random transforms of training inputs", metavar="NAME")
    evaluate_train: bool = option(False, "evaluate the whole training set at each evaluation, as ClinicaDL does")
    batchnorm_recompute: int = option(
        64, "training images used to recompute BatchNorm statistics before each evaluation (0: off)")
    selection_threshold: float = option(0.0, "parts whose validation BA is below this do not vote for the image")
    seed: int = option(0, "seed of weights, data order, dropout and augmentation")
    deterministic: bool = option(False, "deterministic algorithms: a CPU rerun is bit-identical")
    amp: bool = option(False, "mixed precision: bfloat16 on CPU, float16 or bfloat16 on GPU")
    gpu: bool = option(True, "use a GPU when one is present (predict and interpret too: where this job runs)")
    sync_batchnorm: bool = option(False, "data-parallel training: BatchNorm statistics over the whole global batch "
                                  "(all processes), as one process computes them")
    num_workers: int = option(0, "data loading processes (0: load in the training process)")
    memory_layout: Literal["auto", "probe", "channels_last", "contiguous"] = option(
        "auto", "tensor memory layout; auto: channels-last (the faster on the CPUs measured, float32 and "
        "bfloat16); probe: time one training step of each at start and take the faster (not with "
        "--deterministic); contiguous float32 results depend less on how the batch is split")
    folds: tuple[int, ...] = option((), "folds to train, predict and interpret (default: all); one cluster job "
                                    "per fold", flags=("--split",), metavar="FOLD")
    transfer_path: Path | None = option(None, "a MAPS whose model initialises this one (transfer learning)")
    transfer_selection_metric: str = option("loss", "which best-<metric> model of the source MAPS to use")
    n_convblocks: int = option(3, "architecture random: convolution blocks, each halving the grid")
    first_conv_width: int = option(8, "architecture random: channels of the first block, doubled at each block")
    n_conv: int = option(1, "architecture random: convolutions per block")
    channels_limit: int = option(128, "architecture random: the most channels a block may have")
    d_reduction: Literal["MaxPooling", "stride"] = option("MaxPooling", "architecture random: how a block halves "
                                                          "the grid")
    network_normalization: Literal["BatchNorm", "InstanceNorm", "GroupNorm"] = option(
        "BatchNorm", "architecture random: normalisation after each convolution")
    n_fcblocks: int = option(2, "architecture random: fully connected layers, narrowing geometrically")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.learning_rate <= 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ValueError("--learning_rate must be > 0, --weight_decay >= 0 and --dropout in [0, 1)")
        if min((self.evaluation_steps, self.patience, self.batchnorm_recompute, self.num_workers)) < 0:
            raise ValueError("--evaluation_steps, --patience, --batchnorm_recompute and --num_workers must be >= 0")
        if self.multi_network and self.mode == "image":
            raise ValueError("--multi_network needs a mode with parts (patch, roi or slice)")
        if self.experiment and not self.experiment.replace("-", "").replace("_", "").isalnum():
            raise ValueError("--experiment may contain only letters, digits, '-' and '_'")
        if min(self.n_convblocks, self.first_conv_width, self.n_conv, self.channels_limit, self.n_fcblocks) < 1:
            raise ValueError("--n_convblocks, --first_conv_width, --n_conv, --channels_limit and --n_fcblocks "
                             "must be at least 1")


@dataclass(frozen=True)
class Predict:
    """Selected models evaluated on a group: the split's test set, or a new dataset."""

    maps_dir: Path | None = option(None, "the MAPS to predict with (default: OUTPUT_DIR/maps/<experiment>)")
    group_name: str = option("test", "the group: 'test' is the split's test set; another name takes every "
                             "image of BIDS_DIR that has a t1-linear image in the CAPS")
    skip_leak_check: bool = option(False, "evaluate even on subjects or images seen in training: both waivers "
                                   "below (recorded)")
    skip_label_check: bool = option(False, "waive the participant-label check only: predict on participants whose "
                                    "labels were seen in training (recorded)")
    skip_content_check: bool = option(False, "waive the content check only: predict on images whose source file or "
                                      "signature matches a training image's (recorded)")
    near_duplicate: float = option(0.9, "image signature correlation from which two images are the same scan")

    def __post_init__(self) -> None:
        if not self.group_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("--group_name may contain only letters, digits, '-' and '_'")
        if self.group_name in ("train", "validation", "train+validation"):
            raise ValueError(f"--group_name {self.group_name} is reserved for the data a model was trained on")

    @property
    def waived(self) -> tuple[bool, bool]:
        """(labels, content): which leakage checks the user waived."""
        return self.skip_leak_check or self.skip_label_check, self.skip_leak_check or self.skip_content_check


@dataclass(frozen=True)
class Interpret:
    """Attribution maps of the selected models on the predicted group, as NIfTI in MNI space."""

    methods: tuple[Literal["gradients", "grad-cam", "integrated-gradients", "occlusion"], ...] = option(
        ("gradients", "grad-cam"), "attribution methods (captum)", metavar="METHOD")
    target: Literal["true", "predicted"] = option("true", "class explained: the true label (when known) or the "
                                                  "predicted one")
    layer: int = option(-1, "Grad-CAM: which convolution (resnet18: stage) of the network, 0 first, -1 last")
    save_individual: bool = option(False, "also write one map per image")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("--methods needs at least one method")


@dataclass(frozen=True)
class Search:
    """Hyperparameter search (--stages search): a study of trials, each a MAPS trained from a sampled
    configuration; any other key of the [search] table is the space (e.g. learning_rate = {exponent = [3, 5]})."""

    study: str = option("", "name of the study, OUTPUT_DIR/search/<study> (default: the [labels] folder's)")
    sampler: Literal["random", "tpe"] = option("random", "random (ClinicaDL's random search) or tpe (Bayesian)")
    objective: str = option("", "validation metric the search optimises, averaged over the folds trained "
                            "(default: BA for classification, loss otherwise)")
    n_trials: int = option(1, "trials this job runs; start the same command many times to run them in parallel")
    seed: int = option(0, "seed of the sampling: the same seed and space draw the same trials")
    storage: str = option("", "a database URL (e.g. postgresql://...) for large farms; default: the study's "
                          "journal file, shared by every job over the file system")
    pruning: bool = option(False, "stop unpromising trials early (Optuna's median pruner on the objective)")
    space: dict[str, Any] = field(default_factory=dict, metadata={"help": "the space", "flags": (), "metavar": None,
                                                                  "toml_only": True})

    def __post_init__(self) -> None:
        if self.n_trials < 0:
            raise ValueError("--n_trials must be >= 0")
        if self.study and not self.study.replace("-", "").replace("_", "").isalnum():
            raise ValueError("--study may contain only letters, digits, '-' and '_'")


@dataclass(frozen=True)
class Export:
    """One archive of a trained MAPS to share (--stages export): OUTPUT_DIR/exports/<experiment>.tar.gz with the
    selected weights, maps.json, environment, model card and image signatures; no image, no participant label.
    --maps_dir ARCHIVE predicts and interprets with it, the content leakage checks included."""

    include_participants: bool = option(False, "keep participant IDs in the archive's list of training images "
                                        "(default: pseudonyms; the content checks work either way)")
    card_fingerprints: bool = option(False, "list the SHA-256 of every training image's source file in the model "
                                     "card (never names)")


@dataclass(frozen=True)
class Config:
    """Everything one invocation was asked to do."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    execution: Execution = field(default_factory=Execution)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    extraction: Extraction = field(default_factory=Extraction)
    labels: Labels = field(default_factory=Labels)
    split: Split = field(default_factory=Split)
    train: Train = field(default_factory=Train)
    predict: Predict = field(default_factory=Predict)
    interpret: Interpret = field(default_factory=Interpret)
    search: Search = field(default_factory=Search)
    export: Export = field(default_factory=Export)

    SECTIONS: ClassVar[dict[str, type]] = {
        "execution": Execution, "preprocessing": Preprocessing, "extraction": Extraction, "labels": Labels,
        "split": Split, "train": Train, "predict": Predict, "interpret": Interpret, "search": Search, "export": Export}

    @property
    def caps_dir(self) -> Path:
        return self.execution.caps_dir or self.output_dir / "caps"

    def to_toml(self) -> str:
        tables = {name: plain(getattr(self, name), keep_none=False) for name in self.SECTIONS}
        head = {"bids_dir": str(self.bids_dir), "output_dir": str(self.output_dir)}
        return tomli_w.dumps({"run": {**head, "analysis_level": self.analysis_level}, **tables})


def plain(section: Any, keep_none: bool = True) -> dict[str, Any]:
    """A settings dataclass as JSON/TOML values (paths as strings, tuples as lists); TOML has no None, so
    `keep_none=False` drops unset values."""
    out = {}
    for key, value in asdict(section).items():
        if value is None and not keep_none:
            continue
        if isinstance(value, tuple | list):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out
