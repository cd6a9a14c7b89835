"""OUTPUT_DIR/search/<study>/: one hyperparameter search (an Optuna study) and a MAPS per trial.

search/<study>/
  journal.log            the Optuna study (JournalFileBackend): every job of the search appends to it
  space.toml             the space and the base configuration every trial starts from
  trials.tsv             one row per trial: state, parameters, objective per fold and mean, seconds, MAPS
  best.json              the best trial so far, and how many trials it was selected among
  report.html            objective by trial, parameter importances and slices, the leaderboard
  trial-<number>/        a full MAPS (predict, interpret and report use it as any other)
  running/trial-<number>.lock   held by the process that runs the trial, released by the kernel at its death
"""

from __future__ import annotations

from pathlib import Path

SEARCH_DIR = "search"


class SearchFolder:
    def __init__(self, root: Path):
        self.root = root

    journal = property(lambda self: self.root / "journal.log")
    journal_lock = property(lambda self: self.root / "journal.log.lock")
    space = property(lambda self: self.root / "space.toml")
    trials = property(lambda self: self.root / "trials.tsv")
    best = property(lambda self: self.root / "best.json")
    report = property(lambda self: self.root / "report.html")

    def trial(self, number: int) -> Path:
        """The trial's MAPS folder."""
        return self.root / f"trial-{number}"

    def running(self, number: int) -> Path:
        return self.root / "running" / f"trial-{number}.lock"
