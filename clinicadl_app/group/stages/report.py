"""The report stage: maps/<experiment>/report.html, one self-contained page (figures inlined) built only from
what the MAPS and the split folder hold, so it can be rebuilt at any time and mailed as one file.

Sections: summary (task, data, configuration, environment), population of each set, learning curves,
metrics per fold with bootstrap 95 % intervals and mean +- sd over folds, ROC curves and confusion matrices
(classification) or predicted-vs-true plots (regression), attribution and reconstruction-error maps over the
template with one colour scale across folds.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from clinicadl_app.core.atomic import write_text
from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import UsageError
from clinicadl_app.core.figures import pyplot
from clinicadl_app.core.html import figure_uri, file_uri, img, page, table
from clinicadl_app.group.experiment import experiment_name
from clinicadl_app.group.model_card import write_model_card
from clinicadl_app.group.results import KEY_METRICS, metric_tables
from clinicadl_app.layouts.maps import Maps
from clinicadl_app.layouts.splits import SplitFolder

log = logging.getLogger("clinicadl_app")


def learning_curve_figure(logs: list[Path], task: str, fold: int):
    """Loss and the task's main metric per evaluation; every point is marked, so a one- or two-epoch run
    (one evaluation per epoch) still shows its curves."""
    plt = pyplot()
    main = {"classification": "BA", "regression": "MAE", "reconstruction": "SSIM"}[task]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for n, path in enumerate(logs):  # one log per network (multi-network): a pair of colours each
        frame = pd.read_csv(path, sep="\t")
        x = frame.step  # one row per evaluation; evaluation_steps may add several per epoch
        tag = "" if path.parent.name == "training_logs" else f" {path.parent.name}"
        train, validation = {"color": f"C{2 * n % 10}"}, {"color": f"C{(2 * n + 1) % 10}"}
        left.plot(x, frame.loss_train, "-o", ms=3, label=f"train{tag}", **train)
        left.plot(x, frame.loss_validation, "--s", ms=3, label=f"validation{tag}", **validation)
        if f"{main}_train" in frame:
            right.plot(x, frame[f"{main}_train"], "-o", ms=3, label=f"train{tag}", **train)
        if f"{main}_validation" in frame:
            right.plot(x, frame[f"{main}_validation"], "--s", ms=3, label=f"validation{tag}", **validation)
    left.set(xlabel="update step", ylabel="loss", title=f"split-{fold}: loss")
    right.set(xlabel="update step", ylabel=main, title=f"split-{fold}: {main}")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    return fig


def _learning_curves(maps: Maps, task: str) -> str:
    figures = []
    for fold in maps.folds():
        logs = sorted(maps.fold_dir(fold).glob("training_logs/**/training.tsv"))
        if logs:
            figures.append(img(figure_uri(learning_curve_figure(logs, task, fold)), f"learning curves, split-{fold}"))
    return "".join(figures) or "<p>No training log.</p>"


def draw_confusion_matrix(ax, matrix: np.ndarray, classes: list[str]) -> None:
    """Counts on their cells, white on the dark ones so that every count stays readable."""
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    for (i, j), value in np.ndenumerate(matrix):
        dark = sum(shown.cmap(shown.norm(value))[:3]) / 3 < 0.5
        ax.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black")
    k = len(classes)
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="confusion matrix")


def _metric_tables(maps: Maps, task: str) -> str:
    frame, summary = metric_tables(maps, KEY_METRICS[task])
    if frame.empty:
        return "<p>No metrics yet.</p>"
    return ("<h3>Mean ± sd over splits</h3>" + table(summary)
            + "<h3>Per split (bootstrap 95 % interval, resampling participants)</h3>" + table(frame))


def _outcome_figures(maps: Maps, task: str, classes: list[str] | None) -> str:
    plt = pyplot()
    from sklearn.metrics import confusion_matrix, roc_curve

    figures = []
    for fold in maps.folds():
        for metric in maps.selection_metrics(fold)[:1]:
            for group in ("test", "validation"):
                path = maps.prediction(fold, metric, group, "image")
                if not path.is_file():
                    continue
                frame = pd.read_csv(path, sep="\t")
                if task == "classification" and frame.true_label.notna().all():
                    k = len(classes or [])
                    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
                    truth = frame.true_label.astype(int)
                    for c in range(k):
                        if 0 < (truth == c).sum() < len(truth):
                            fpr, tpr, _ = roc_curve(truth == c, frame[f"proba{c}"])
                            left.plot(fpr, tpr, label=classes[c])
                        if k == 2:
                            break
                    left.plot([0, 1], [0, 1], ":", color="grey")
                    left.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
                    left.legend(fontsize=7)
                    matrix = confusion_matrix(truth, frame.predicted_label.astype(int), labels=list(range(k)))
                    draw_confusion_matrix(right, matrix, classes)
                    figures.append(img(figure_uri(fig), f"split-{fold} best-{metric} on {group}"))
                elif task == "regression" and frame.true_label.notna().all():
                    fig, ax = plt.subplots(figsize=(4.2, 4))
                    ax.scatter(frame.true_label, frame.predicted_label, s=12)
                    low = float(min(frame.true_label.min(), frame.predicted_label.min()))
                    high = float(max(frame.true_label.max(), frame.predicted_label.max()))
                    ax.plot([low, high], [low, high], ":", color="grey")
                    ax.set(xlabel="true", ylabel="predicted", title=f"split-{fold} on {group}")
                    figures.append(img(figure_uri(fig), f"split-{fold} best-{metric} on {group}"))
    return "".join(figures) or "<p>No labelled predictions yet.</p>"


def _voxel_maps(maps: Maps) -> str:
    """Each mean map over the template, one row per fold and selection metric on one colour scale, so that
    folds compare by eye; then the autoencoders' input/output/difference examples."""
    import nibabel as nib

    from clinicadl_app.group import map_figures
    from clinicadl_app.images.templates import template_on

    same: dict[tuple[str, str], list[Path]] = {}  # (group, file name) -> one map per fold and metric
    for path in sorted(maps.root.glob("split-*/best-*/*/interpret-*/group-*_mean.nii.gz")):
        same.setdefault((path.parents[1].name, path.name), []).append(path)
    figures = []
    for (group, name), paths in same.items():
        images = [nib.load(str(path)) for path in paths]
        data = [np.asanyarray(image.dataobj, dtype=np.float32) for image in images]
        background = template_on(data[0].shape, images[0].affine)
        rows = [(f"{path.parents[3].name} {path.parents[2].name}", values) for path, values in zip(paths, data,
                                                                                                   strict=True)]
        stem = name.removesuffix("_mean.nii.gz")
        figure = map_figures.overlay_rows(background, rows, map_figures.scale_of(data), f"{stem} over MNI152")
        figures.append(img(figure_uri(figure), f"{group}: {stem} (one colour scale for all rows; files: "
                                               f"{paths[0].parent.name}/{name})"))
    figures += [img(file_uri(path), f"{path.parents[3].name} {path.parents[2].name}: {path.stem}")
                for path in sorted(maps.root.glob("split-*/best-*/*/interpret-*/*_desc-reconstruction_example.png"))]
    return "".join(figures) or "<p>No interpretation yet (stage interpret).</p>"


def write_report(maps: Maps, fingerprints: bool = False) -> Path:
    record = json.loads(maps.record.read_text())
    task = record["task"]
    environment = maps.environment.read_text().split("packages:")[0] if maps.environment.exists() else ""
    folder = SplitFolder(maps.recorded(record["split_directory"])) if record.get("split_directory") else None
    population = ""
    if folder is not None and folder.population_table.is_file():
        population = table(pd.read_csv(folder.population_table, sep="\t"))
        if folder.population_figure.is_file():
            population += img(file_uri(folder.population_figure), "population of the split")
    groups = []
    for group in maps.groups():
        info = maps.group_record(group)
        if info.is_file():
            data = json.loads(info.read_text())
            groups.append({"group": group, "origin": data.get("origin", ""), "leak check": data.get("leak_check", ""),
                           "labels check": data.get("label_check", ""), "content check": data.get("content_check", "")})
    summary = {
        "experiment": record["experiment"], "task": task, "label": record["label"],
        "classes": ", ".join(record.get("classes") or []) or "-", "mode": record["mode"],
        "architecture": record["train"]["architecture"], "input size": "x".join(map(str, record["input_size"])),
        "epochs": record["train"]["epochs"], "batch size": record["train"]["batch_size"],
        "seed": record["seed"], "clinicadl-app": record["clinicadl_app_version"], "created": record["created"],
        "container": _container(record.get("container")),
        "command": record.get("command_line", " ".join(record.get("command", []))),
    }
    folds = maps.folds()
    unfinished = [fold for fold in folds if not maps.trained(fold)]
    summary["splits trained"] = ", ".join(f"split-{fold}" for fold in folds if fold not in unfinished) or "none"
    if unfinished:  # their curves are shown; their best-so-far models are predicted by no stage
        summary["splits trained"] += "; training did not finish: " + ", ".join(f"split-{f}" for f in unfinished)
    drawn = range(record["split"]["split"]["n_splits"] or 1)
    untrained = [fold for fold in drawn if fold not in folds]
    if untrained:  # the means over folds are over fewer folds than the split has: a researcher must see it
        summary["splits trained"] += (f"; not trained, of the split's {len(drawn)}: "
                                      + ", ".join(f"split-{fold}" for fold in untrained))
    if "search" in record:  # a trial of a search: chosen on validation data among others
        summary["search"] = f"trial {record['search']['trial']} of study {record['search']['study']}"
    body = [
        f"<h1>{html.escape(record['experiment'])}</h1>",
        "<p class='note'>Everything on this page comes from the MAPS and its split folder; rebuild it with "
        "<code>--stages report</code>.</p>",
        "<h2>Summary</h2>", table(pd.DataFrame([summary]).T.reset_index().rename(columns={"index": "", 0: "value"})),
        "<details><summary>Full configuration (maps.json)</summary><pre>"
        + html.escape(json.dumps({k: record[k] for k in ("train", "labels", "extraction_settings") if k in record},
                                 indent=2)) + "</pre></details>",
        "<details><summary>Environment</summary><pre>" + html.escape(environment) + "</pre></details>",
        "<h2>Population</h2>", population or "<p>No population report.</p>",
        "<h2>Groups</h2>", table(pd.DataFrame(groups)) if groups else "",
        "<h2>Learning curves</h2>", _learning_curves(maps, task),
        "<h2>Metrics</h2>", _metric_tables(maps, task),
        "<h2>Predictions</h2>", _outcome_figures(maps, task, record.get("classes")),
        "<h2>Attribution and error maps</h2>", _voxel_maps(maps),
    ]
    write_text(maps.report, page(record["experiment"], body))
    write_model_card(maps, fingerprints)
    log.info("report: %s", maps.report)
    return maps.report


def _container(found: dict | None) -> str:
    if not found:
        return "none (installed with pip)"
    return f"{found['Type']} {found['Tag']}" + (f" ({found['URI']})" if found.get("URI") else "")


def run_report(config: Config, maps_dir: Path) -> Path:
    maps = Maps(config.predict.maps_dir or maps_dir / experiment_name(config))
    if not maps.record.is_file():
        raise UsageError(f"{maps.root}: no MAPS to report on; train first or give --maps_dir")
    return write_report(maps, config.export.card_fingerprints)
