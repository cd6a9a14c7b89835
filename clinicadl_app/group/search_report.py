"""search/<name>/report.html: the objective by trial, what mattered (Optuna's importance and slice plots), and
the leaderboard, rebuilt from the study after every trial."""

from __future__ import annotations

import html
import logging
import warnings

import optuna
import pandas as pd

from clinicadl_app.core.atomic import write_text
from clinicadl_app.core.figures import pyplot
from clinicadl_app.core.html import figure_uri, img, page, table
from clinicadl_app.layouts.search import SearchFolder

log = logging.getLogger("clinicadl_app")


def write_search_report(study: optuna.Study, search: SearchFolder, objective: str) -> None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    body = [f"<h1>Search {html.escape(search.root.name)}</h1>",
            f"<p class='note'>Objective: validation {html.escape(objective)} averaged over the folds trained "
            f"({study.direction.name.lower()}). The best trial was selected on validation data: its validation "
            "score is optimistic; predict on the test set with its MAPS for the honest estimate.</p>"]
    if search.trials.is_file():
        trials = pd.read_csv(search.trials, sep="\t", keep_default_na=False)
        body += ["<h2>Trials</h2>", img(figure_uri(_by_trial(trials, objective)), f"{objective} by trial")]
        mean = f"{objective}_mean"
        done = trials[trials.state == "COMPLETE"].copy()
        if len(done):
            done[mean] = done[mean].astype(float)
            done = done.sort_values(mean, ascending=study.direction.name == "MINIMIZE")
        body += ["<h2>Leaderboard</h2>", table(done) if len(done) else "<p>No complete trial yet.</p>"]
        others = trials[trials.state != "COMPLETE"]
        if len(others):
            body += ["<details><summary>Failed, pruned and running trials</summary>", table(others), "</details>"]
    body += ["<h2>What mattered</h2>", _importance(study, len(complete))]
    write_text(search.report, page(f"search {search.root.name}", body))


def _by_trial(trials: pd.DataFrame, objective: str):
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 3.5))
    done = trials[trials.state == "COMPLETE"]
    axis.plot(done.number, done[f"{objective}_mean"].astype(float), "o", label="complete")
    axis.set_xlabel("trial")
    axis.set_ylabel(f"validation {objective} (mean over folds)")
    axis.legend(fontsize=8)
    return fig


def _importance(study: optuna.Study, complete: int) -> str:
    if complete < 2 or not study.best_trial.params:
        return "<p>Importance and slice plots need two complete trials.</p>"
    from optuna.visualization import matplotlib as plots

    parts = []
    for name, plot in (("parameter importance", plots.plot_param_importances), ("slices", plots.plot_slice)):
        try:
            with warnings.catch_warnings():  # Optuna's "experimental" notices and few-trial axis warnings: the
                warnings.simplefilter("ignore")  # figure is the message, not lines in every search job's log
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. a parameter with one value
            parts.append(f"<p class='note'>{name}: not available ({html.escape(str(error))})</p>")
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        parts.append(img(figure_uri(first.get_figure()), name))
    return "".join(parts)
