"""Bootstrap intervals resample participants, as the splits are made: sessions of one person move together."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from clinicadl_app.group.metrics import bootstrap


def _correlated(sessions: int, seed: int = 0):
    """10 participants, each with `sessions` sessions that the model scores alike (one draw per person)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(10) % 2, sessions)
    score = np.repeat(np.clip(rng.normal(0.5, 0.25, 10) + 0.15 * (np.arange(10) % 2), 0.01, 0.99), sessions)
    groups = np.repeat([f"sub-{i}" for i in range(10)], sessions)
    return truth, np.stack([1 - score, score], 1), groups


def test_intervals_over_participants_are_wider_than_over_sessions_when_sessions_agree():
    truth, proba, groups = _correlated(sessions=6)
    by_person = bootstrap(truth, proba, "classification", groups)
    by_row = bootstrap(truth, proba, "classification")
    for name in ("accuracy", "BA", "AUC"):
        width_person = by_person[name][1] - by_person[name][0]
        width_row = by_row[name][1] - by_row[name][0]
        assert width_person > 1.5 * width_row, (name, width_person, width_row)


def test_one_session_per_participant_is_the_ordinary_bootstrap():
    truth, proba, groups = _correlated(sessions=1)
    by_person = bootstrap(truth, proba, "classification", groups, n=4000)
    by_row = bootstrap(truth, proba, "classification", n=4000, seed=1)
    for name in ("accuracy", "AUC"):
        assert abs(by_person[name][0] - by_row[name][0]) < 0.12 and abs(by_person[name][1] - by_row[name][1]) < 0.12


def test_weighted_auc_equals_auc_of_the_resampled_rows():
    """The vectorised weighting must give what an explicit resample gives: AUC of the duplicated rows."""
    truth, proba, groups = _correlated(sessions=2, seed=3)
    rng = np.random.default_rng(0)
    drawn = rng.multinomial(10, np.full(10, 0.1))
    rows = np.concatenate([np.flatnonzero(groups == f"sub-{i}").repeat(k) for i, k in enumerate(drawn)])
    expected = roc_auc_score(truth[rows], proba[rows, 1])
    interval = bootstrap(truth, proba, "classification", groups, n=1, seed=0)
    # n=1: the interval collapses on the single resample, the same multinomial draw as above
    assert np.isclose(interval["AUC"][0], expected) and np.isclose(interval["AUC"][1], expected)


def test_regression_intervals_hold_the_estimate():
    rng = np.random.default_rng(0)
    truth = np.repeat(rng.normal(70, 8, 12), 3)
    predicted = truth + np.repeat(rng.normal(0, 4, 12), 3)
    groups = np.repeat(np.arange(12), 3)
    interval = bootstrap(truth, predicted, "regression", groups)
    mae = np.abs(predicted - truth).mean()
    assert interval["MAE"][0] < mae < interval["MAE"][1]
    assert interval["R2"][0] < interval["R2"][1] <= 1


def test_degenerate_predictions_give_nan_metrics_without_warnings():
    """A one-epoch model often predicts one class for every image: the undefined metrics are NaN, the defined
    ones are right, and nothing is printed (numpy's 'Mean of empty slice' used to reach the user's terminal)."""
    import warnings

    from clinicadl_app.group.metrics import classification

    truth = np.array([0, 0, 1, 1, 2, 2])
    for k in (2, 3):
        labels = truth % k
        proba = np.tile(np.eye(k)[0], (len(truth), 1))  # everything predicted as class 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = classification(labels, proba, [f"c{c}" for c in range(k)])
        assert result["accuracy"] == (labels == 0).mean()
        assert result["BA"] == 1 / k
        if k == 3:
            assert result["AUC-c0"] == 0.5 and np.isclose(result["PPV"], (labels == 0).mean())
