"""maps/<experiment>/model_card.md: what a stranger needs to judge or reuse a MAPS without reading code.

Task and classes, the data (counts per set, class, sex and age; never participant names), how the split was
drawn, metrics per fold with their 95 % intervals, intended use and limits, and the software, container and
command that made it. Written after training and again by the report, from the MAPS and its split alone.
"""

from __future__ import annotations

import json

import pandas as pd

from clinicadl_app.core.atomic import write_text
from clinicadl_app.group.results import KEY_METRICS, metric_tables
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.splits import SplitFolder


def markdown_table(frame: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join(str(v).replace("|", "/") for v in row) + " |"  # noqa: E731
    lines = [cells(frame.columns), "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + [cells(row) for row in frame.itertuples(index=False)])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _held_out(name: str, amount: float | None) -> str:
    """[split] n_test and n_validation: below 1 a share of the subjects, from 1 a number of them."""
    if amount is None:
        return f"{name} set: n/a"
    if amount == 0:
        return f"no {name} set"
    if amount >= 1:
        return f"{name} set of {_count(int(amount), 'participant')}"
    return f"{name} set of {amount * 100:g} % of the participants"


def _grid(record: dict) -> str:
    """The images' grid as recorded; a MAPS that records no image size was trained on the 1 mm grid that its
    extraction names."""
    uncropped = (record.get("extraction") or {}).get("use_uncropped_image", False)
    size = record.get("image_size", [1, 193, 229, 193] if uncropped else [1, 169, 208, 179])[1:]
    known = {(169, 208, 179): "1 mm, cropped", (193, 229, 193): "1 mm, uncropped"}
    return f"MNI152NLin2009cSym, {known.get(tuple(size), 'resampled')}, {'x'.join(map(str, size))}"


def _task(record: dict) -> list[str]:
    train = record["train"]
    task = record["task"]
    what = {"classification": f"classify `{record['label']}` into {', '.join(record.get('classes') or [])}",
            "regression": f"predict `{record['label']}` (a number)",
            "reconstruction": "reconstruct the input image (autoencoder)"}[task]
    return [f"- **Task**: {what}.",
            f"- **Input**: {record['mode']} mode, {'x'.join(map(str, record['input_size']))} per input "
            f"({_count(record.get('parts', 1), 'part')} per image), t1-linear images ({_grid(record)}).",
            f"- **Network**: {train['architecture']}, {_count(train['epochs'], 'epoch')} at most, batch "
            f"{train['batch_size']}, "
            f"{train['optimizer']} at learning rate {train['learning_rate']}, seed {record['seed']}; selected per "
            f"fold on validation {', '.join(record['selection_metrics'])}."]


def _data(record: dict, folder: SplitFolder | None) -> list[str]:
    split = record["split"]
    settings = split.get("split", {})
    lines = [f"- **Labels**: column `{record['label']}` of participants.tsv (labels file SHA-256 "
             f"`{split.get('labels_sha256', 'n/a')[:16]}...`).",
             f"- **Split** (by participant, drawn before any training): {_held_out('test', settings.get('n_test'))}, "
             f"{_count(settings.get('n_splits') or 1, 'fold')}"
             + (f" ({_held_out('validation', settings.get('n_validation'))})" if not settings.get('n_splits') else "")
             + f", seed {settings.get('seed')}, age and sex balance checked (p >= {settings.get('p_age')}, "
             f"{settings.get('p_sex')}); membership SHA-256 `{record.get('split_membership_sha256', 'n/a')[:16]}...` "
             "(a MAPS is bound to it)."]
    if folder is not None and folder.population_table.is_file():
        lines += ["", "Participants and sessions per set and class (age in years, sex counts):", "",
                  markdown_table(pd.read_csv(folder.population_table, sep="\t", keep_default_na=False))]
    elif split.get("counts"):  # an exported MAPS: the split folder stayed home, its counts came along
        counts = pd.DataFrame([{"set": name, **count} for name, count in split["counts"].items()])
        lines += ["", "Participants and sessions per set:", "", markdown_table(counts)]
    return lines


def training_fingerprints(maps: Maps) -> list[str]:
    """The SHA-256 of every training image's source file, sorted, without names: anyone holding a scan can
    tell whether it was trained on, and nobody learns who was."""
    if not maps.seen.is_file():
        return ["No record of the training images."]
    seen = pd.read_csv(maps.seen, sep="\t", dtype=str, keep_default_na=False)
    sources = seen.get("source_sha256", pd.Series("", index=seen.index))
    digests = sorted(set(sources) - {""})
    lines = [f"SHA-256 of the {len(digests)} source file(s) (BIDS T1w) of the images used for training or model "
             "selection, sorted; anatomy signatures of every image are in groups/train+validation_signatures.npz."]
    unknown = int((sources == "").sum())
    if unknown:
        lines.append(f"{unknown} image(s) have no recorded source file (made by another tool, or generated): only "
                     "their anatomy signatures identify them.")
    return [*lines, "", "```", *digests, "```"]


def _metrics(maps: Maps, task: str) -> list[str]:
    frame, summary = metric_tables(maps, KEY_METRICS[task])
    if frame.empty:
        return ["No metrics yet (train, then predict)."]
    return ["Mean ± sd over folds:", "", markdown_table(summary), "",
            "Per fold, with bootstrap 95 % intervals that resample participants:", "", markdown_table(frame)]


def _limits(record: dict) -> list[str]:
    return [
        "- Research use only: not a medical device, not for diagnosis of individuals.",
        "- Inputs must be t1-linear images as made by this app or Clinica (same template, crop and intensity "
        "handling); other preprocessing gives meaningless outputs.",
        f"- Validated only on the groups above, drawn from `{_trained_from(record)}`; other scanners, "
        "sites, ages or diseases are untested. Small test sets give wide intervals: read them.",
        "- `predict` refuses images this model was trained or selected on (labels, file hashes and anatomy "
        "signatures in groups/): use it, not a hand-written loader, to evaluate.",
    ]


def _trained_from(record: dict) -> str:
    return record.get("bids_directory") or (record.get("exported") or {}).get("trained_from", {}).get("bids_directory")


def _provenance(maps: Maps, record: dict) -> list[str]:
    container = record.get("container")
    image = (f"{container['Type']} {container['Tag']}" + (f" ({container['URI']})" if container.get("URI") else "")
             if container else "none (installed with pip)")
    environment = maps.environment.read_text().split("packages:")[0].strip() if maps.environment.is_file() else ""
    command = record.get("command_line") or " ".join(record.get("command", []))
    return [f"- **Made by** clinicadl-app {record['clinicadl_app_version']} on {record['created']}.",
            f"- **Container**: {image}.", f"- **Command**: `{command}` (in `{record.get('working_directory', '?')}`).",
            "", "```", environment, "```"]


def write_model_card(maps: Maps, fingerprints: bool = False) -> None:
    """`fingerprints`: also list the training images' source SHA-256 ([export] card_fingerprints)."""
    record = json.loads(maps.record.read_text())
    folder = SplitFolder(maps.recorded(record["split_directory"])) if record.get("split_directory") else None
    sections = [f"# Model card: {record['experiment']}", "",
                "## Model", *_task(record), "", "## Data", *_data(record, folder), "",
                "## Performance", *_metrics(maps, record["task"]), "", "## Intended use and limits",
                *_limits(record), "", "## Provenance", *_provenance(maps, record), ""]
    if fingerprints:
        sections += ["## Training fingerprints", *training_fingerprints(maps), ""]
    write_text(maps.model_card, "\n".join(sections))
