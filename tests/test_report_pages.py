"""The report's figures and the model card stay right in the shapes short runs give: one evaluation, a diagonal
confusion matrix, one epoch, a test set given as a count, the uncropped image."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb

from clinicadl_app.core.figures import pyplot
from clinicadl_app.group import model_card
from clinicadl_app.group.stages.report import draw_confusion_matrix, learning_curve_figure
from clinicadl_app.layouts.output import OutputLayout


def _luminance(colour) -> float:
    return float(np.mean(to_rgb(colour)))


def test_a_one_evaluation_run_draws_every_curve_in_the_same_colours_on_both_panels(tmp_path):
    log = tmp_path / "training_logs" / "training.tsv"
    log.parent.mkdir()
    pd.DataFrame({"epoch": [0], "step": [6], "loss_train": [0.69], "loss_validation": [0.70],
                  "BA_train": [0.5], "BA_validation": [1.0]}).to_csv(log, sep="\t", index=False)
    fig = learning_curve_figure([log], "classification", 0)
    left, right = fig.axes
    colours = {}
    for ax in (left, right):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "validation"}
        for label, line in lines.items():
            assert len(line.get_xdata()) == 1
            assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0, label
            colours.setdefault(label, set()).add(to_rgb(line.get_color()))
    assert all(len(c) == 1 for c in colours.values()), f"one colour per set across panels: {colours}"
    assert colours["train"] != colours["validation"]
    pyplot().close(fig)


def test_confusion_counts_contrast_with_their_cells():
    fig, ax = pyplot().subplots()
    matrix = np.array([[0, 3], [0, 3]])
    draw_confusion_matrix(ax, matrix, ["AD", "CN"])
    (image,) = ax.get_images()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 4
    for (i, j), value in np.ndenumerate(matrix):
        text = texts[i, j]
        assert text.get_text() == str(value)
        cell = _luminance(image.cmap(image.norm(value))[:3])
        assert abs(_luminance(text.get_color()) - cell) > 0.4, (i, j, cell, text.get_color())
    pyplot().close(fig)


def test_the_model_card_says_what_the_record_says():
    record = {"task": "classification", "label": "diagnosis", "classes": ["AD", "CN"], "mode": "roi",
              "input_size": [1, 50, 50, 50], "parts": 1, "seed": 3, "selection_metrics": ["loss"],
              "extraction": {"use_uncropped_image": True},
              "train": {"architecture": "Conv5_FC3", "epochs": 1, "batch_size": 2, "optimizer": "SGD",
                        "learning_rate": 0.01},
              "split": {"split": {"n_test": 6, "n_splits": 0, "n_validation": 0.25, "seed": 1}}}
    task, data = " ".join(model_card._task(record)), " ".join(model_card._data(record, None))
    assert "1 part per image" in task and "uncropped, 193x229x193" in task and "1 epoch at most" in task
    assert "test set of 6 participants, 1 fold (validation set of 25 % of the participants)" in data
    record["split"]["split"] |= {"n_test": 0, "n_splits": 3}
    record["extraction"]["use_uncropped_image"] = False
    record["train"]["epochs"] = 5
    task, data = " ".join(model_card._task(record)), " ".join(model_card._data(record, None))
    assert "cropped, 169x208x179" in task and "uncropped" not in task and "5 epochs at most" in task
    assert "no test set, 3 folds," in data
    record["image_size"] = [1, 85, 104, 90]  # as maps.json records it: generated or downsampled images say so
    assert "(MNI152NLin2009cSym, resampled, 85x104x90)" in " ".join(model_card._task(record))
    record["extraction"]["use_uncropped_image"], record["image_size"] = True, [1, 169, 208, 179]
    assert "(MNI152NLin2009cSym, 1 mm, cropped, 169x208x179)" in " ".join(model_card._task(record))


def test_the_closing_line_names_quality_check_pages_only_where_they_are(tmp_path):
    """The group level's last line pointed at OUTPUT_DIR/reports/sub-*.html even for a CAPS made elsewhere."""
    out, other = OutputLayout(tmp_path / "out"), OutputLayout(tmp_path / "other")
    assert out.qc_pages(tmp_path / "out" / "caps") is None  # a generated CAPS: no page anywhere
    (other.reports_dir).mkdir(parents=True)
    (other.reports_dir / "sub-01.html").write_text("<html></html>")
    assert out.qc_pages(tmp_path / "other" / "caps") == other.reports_dir / "sub-*.html"
    out.reports_dir.mkdir(parents=True)
    (out.reports_dir / "sub-02.html").write_text("<html></html>")
    assert out.qc_pages(tmp_path / "out" / "caps") == out.reports_dir / "sub-*.html"
