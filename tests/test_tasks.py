"""What a task learns from the training labels (class weights) and how part-based models vote (selection
threshold), against values worked out by hand."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from clinicadl_app.group.tasks import make_task


def test_class_weights_are_inverse_frequencies_and_weigh_the_loss():
    labels = pd.DataFrame({"diagnosis": ["AD"] * 6 + ["CN"] * 2})
    plain = make_task("classification", labels, "diagnosis", "", False)
    weighted = make_task("classification", labels, "diagnosis", "", True)
    assert plain.class_weights is None
    assert weighted.class_weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    outputs, targets = torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    each = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
    expected = (each[0] * 2 / 3 + each[1] * 2) / (2 / 3 + 2)  # torch's weighted mean
    assert float(weighted.loss()(outputs, targets)) == pytest.approx(float(expected))
    assert float(plain.loss()(outputs, targets)) == pytest.approx(float(each.mean()))


def _parts() -> pd.DataFrame:
    """Four images (two per class), three patches each: patch 0 always right, patch 1 always says class 0,
    patch 2 always wrong."""
    rows = []
    for image, truth in enumerate([0, 0, 1, 1]):
        for patch, says in ((0, truth), (1, 0), (2, 1 - truth)):
            proba1 = 0.9 if says == 1 else 0.1
            rows.append({"participant_id": f"sub-{image}", "session_id": "ses-M000", "patch_id": patch,
                         "true_label": truth, "predicted_label": says, "proba0": 1 - proba1, "proba1": proba1})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("threshold", "weights"), [(0.0, {0: 1.0, 1: 0.5, 2: 0.0}), (0.6, {0: 1.0, 1: 0.0, 2: 0.0}),
                                                    (1.01, {0: 0.0, 1: 0.0, 2: 0.0})])
def test_selection_threshold_silences_the_parts_below_it(threshold, weights):
    task = make_task("classification", pd.DataFrame({"d": ["0", "1"]}), "d", "", False)
    parts = _parts()
    assert task.part_weights(parts, "patch_id", threshold) == pytest.approx(weights)
    images = task.ensemble(parts, "patch_id", task.part_weights(parts, "patch_id", threshold))
    voting = {p: w for p, w in weights.items() if w > 0} or {0: 1.0, 1: 1.0, 2: 1.0}  # none: all vote equally
    for _, image in images.iterrows():
        mine = parts[parts.participant_id == image.participant_id].set_index("patch_id")
        expected = sum(w * mine.proba1[p] for p, w in voting.items()) / sum(voting.values())
        assert image.proba1 == pytest.approx(expected)
    if threshold == 0.6:
        assert list(images.predicted_label) == list(images.true_label), "only the right patch votes"
