"""Subject-level splits, drawn before any training so that nothing later can leak.

A test set, then k folds (or one validation split) of the rest. Every session of a subject falls on the
same side. Draws are stratified on the subject's baseline class (regression: quantile bins of its mean
label); classes declared as subgroups of a parent are their own strata, so they are split first and the
rest of the parent after, and every child test subject is in the one test set that no training sees.
Age (Welch t-test) and sex (Fisher exact test) are compared between the sets within each class; draws are
repeated up to a bound and the best one is kept, with a warning when the thresholds were not met.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import special, stats

from clinicadl_app.core.config import Split
from clinicadl_app.core.errors import UsageError
from clinicadl_app.layouts.bids import ACQ_TIME, acq_times
from clinicadl_app.layouts.caps import KEYS, session_order

log = logging.getLogger(__name__)


@dataclass
class Balance:
    """The smallest p-values over classes (1.0 when a comparison could not be made)."""

    p_age: float = 1.0
    p_sex: float = 1.0

    def score(self, settings: Split) -> float:
        """>= 1 when both thresholds are met; otherwise how close the worst comparison came."""
        ratios = [self.p_age / settings.p_age if settings.p_age else math.inf,
                  self.p_sex / settings.p_sex if settings.p_sex else math.inf]
        return min(ratios)


@dataclass
class Draw:
    name: str
    attempts: int
    met: bool
    balance: list[Balance] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        return {"attempts": self.attempts, "thresholds_met": self.met,
                "p_values": [{k: round(v, 6) for k, v in asdict(b).items()} for b in self.balance]}

    def describe(self) -> str:
        """The p-values of the set drawn, or of each fold by its split folder's name."""
        texts = [f"p_age {b.p_age:.3f}, p_sex {b.p_sex:.3f}" for b in self.balance]
        return texts[0] if len(texts) == 1 else "; ".join(f"split-{i} {text}" for i, text in enumerate(texts))


@dataclass
class SplitResult:
    test: list[str]
    folds: list[list[str]]
    """Validation participants of each fold (one entry when n_splits is 0)."""
    draws: list[Draw]


def subject_table(rows: pd.DataFrame, column: str, task: str, bins: int) -> pd.DataFrame:
    """One row per participant: stratum (baseline class or label bin), class for balance tests, age, sex."""
    ordered = in_session_order(rows)
    first = ordered.groupby("participant_id", sort=True).first()
    subjects = pd.DataFrame(index=first.index)
    if task == "classification":
        subjects["stratum"] = first[column].astype(str)
        subjects["cls"] = subjects["stratum"]
    else:
        mean = ordered.groupby("participant_id", sort=True)[column].mean()
        n_bins = max(1, min(bins, len(mean) // 2))
        ranks = mean.rank(method="first")
        subjects["stratum"] = pd.qcut(ranks, n_bins, labels=False).astype(str) if n_bins > 1 else "all"
        subjects["cls"] = "all"
    subjects["age"] = pd.to_numeric(first["age"], errors="coerce") if "age" in first else np.nan
    subjects["sex"] = first.get("sex")
    return subjects


def _quota(sizes: pd.Series, amount: float, name: str) -> pd.Series:
    """Subjects to draw from each stratum: the total (a fraction or a count) shared out proportionally, so that
    rounding in each small stratum does not add up to a much larger or smaller set than asked."""
    total = int(round(amount * sizes.sum())) if amount < 1 else int(round(amount))
    if total >= sizes.sum():
        among = "" if name == "test" else " left after the test set"
        raise UsageError(f"[split] n_{name} {amount:g} asks for {total} {name} subjects of the {int(sizes.sum())}"
                         f"{among}, which leaves none to train on; lower n_{name} or add subjects")
    if total == 0:
        raise UsageError(f"[split] n_{name} {amount:g} of {int(sizes.sum())} subjects rounds to no {name} subject; "
                         f"raise n_{name}" + (" (or 0 for no test set)" if name == "test" else ""))
    exact = sizes / sizes.sum() * total
    quota = np.floor(exact).astype(int)
    remainder = (exact - quota).sort_values(ascending=False, kind="stable")
    for stratum in remainder.index[: total - int(quota.sum())]:
        quota[stratum] += 1
    return quota


class _Comparison:
    """Age and sex of each class as arrays, so that a thousand draws cost milliseconds, not scipy's per-call
    overhead: Welch's t from the same moments and Student-t tail as scipy.stats.ttest_ind, and Fisher's exact
    test (scipy) cached per contingency table, of which a few draws make only a handful."""

    def __init__(self, subjects: pd.DataFrame):
        self.classes = []
        for _, group in subjects.groupby("cls", sort=True):
            where = subjects.index.get_indexer(group.index)
            ages = pd.to_numeric(group.age, errors="coerce").to_numpy(dtype=float)
            known = ~np.isnan(ages)
            sexes = group.sex.dropna()
            levels = sorted(sexes.unique())
            sex_where = subjects.index.get_indexer(sexes.index)
            first_level = (sexes.to_numpy() == levels[0]) if len(levels) == 2 else None
            self.classes.append((where[known], ages[known], sex_where, first_level))

    def __call__(self, held: np.ndarray) -> Balance:
        balance = Balance()
        for where, ages, sex_where, first_level in self.classes:
            inside = held[where]
            p = _welch(ages[inside], ages[~inside])
            if p is not None:
                balance.p_age = min(balance.p_age, p)
            if first_level is not None:
                sex_inside = held[sex_where]
                a, b = int((first_level & sex_inside).sum()), int((~first_level & sex_inside).sum())
                c, d = int((first_level & ~sex_inside).sum()), int((~first_level & ~sex_inside).sum())
                if min(a + b, c + d) > 0:
                    balance.p_sex = min(balance.p_sex, _fisher(a, b, c, d))
        return balance


def _welch(first: np.ndarray, second: np.ndarray) -> float | None:
    if len(first) < 2 or len(second) < 2:
        return None
    v1, v2 = _variance(first) / len(first), _variance(second) / len(second)
    if v1 + v2 == 0:
        return None
    t = (first.mean() - second.mean()) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(first) - 1) + v2**2 / (len(second) - 1))
    p = float(2 * special.stdtr(df, -abs(t)))
    return p if not math.isnan(p) else 1.0


def _variance(ages: np.ndarray) -> float:
    """Zero for equal ages: numpy gives 7.6e-29 for [57.3] * 3, enough to make a t statistic of rounding noise
    and reject balanced draws."""
    return 0.0 if ages.min() == ages.max() else float(ages.var(ddof=1))


@functools.lru_cache(maxsize=4096)
def _fisher(a: int, b: int, c: int, d: int) -> float:
    return float(stats.fisher_exact([[a, b], [c, d]]).pvalue)


def _best_draw(draw: Callable[[], np.ndarray], balances: Callable[[np.ndarray], list[Balance]],
               settings: Split, name: str) -> tuple[np.ndarray, Draw]:
    """Draw until the balance thresholds are met or the attempt budget is spent; keep the best draw."""
    best, best_balances, best_score = None, [], -math.inf
    for attempt in range(1, settings.max_attempts + 1):
        candidate = draw()
        candidate_balances = balances(candidate)
        score = min(b.score(settings) for b in candidate_balances)
        if score > best_score:
            best, best_balances, best_score = candidate, candidate_balances, score
        if score >= 1:
            return best, Draw(name, attempt, True, best_balances)
    assert best is not None
    return best, Draw(name, settings.max_attempts, False, best_balances)


def _hold_out(subjects: pd.DataFrame, amount: float, settings: Split, rng: np.random.Generator,
              name: str) -> tuple[np.ndarray, Draw]:
    """A stratified draw of `amount` subjects (a boolean mask)."""
    sizes = subjects.groupby("stratum", sort=True).size()
    quota = _quota(sizes, amount, name)
    positions = {s: np.flatnonzero(subjects.stratum.values == s) for s in sizes.index}

    def draw() -> np.ndarray:
        held = np.zeros(len(subjects), dtype=bool)
        for stratum, count in quota.items():
            held[rng.choice(positions[stratum], size=int(count), replace=False)] = True
        return held

    compare = _Comparison(subjects)
    return _best_draw(draw, lambda held: [compare(held)], settings, name)


def _folds(subjects: pd.DataFrame, k: int, settings: Split, rng: np.random.Generator,
           classification: bool) -> tuple[np.ndarray, Draw]:
    """A fold number per subject; each stratum is dealt round-robin so fold sizes stay even."""
    sizes = subjects.groupby("stratum", sort=True).size()
    small = sizes[sizes < k]
    if classification and not small.empty:
        listing = ", ".join(f"{s} ({n})" for s, n in small.items())
        raise UsageError(
            f"too few training subjects for {k} folds in class {listing}: each class needs at least {k}; "
            "lower [split] n_splits, lower n_test or add subjects"
        )

    def draw() -> np.ndarray:
        fold = np.empty(len(subjects), dtype=int)
        start = 0
        for stratum in sizes.index:
            members = rng.permutation(np.flatnonzero(subjects.stratum.values == stratum))
            fold[members] = (np.arange(len(members)) + start) % k
            start = (start + len(members)) % k
        return fold

    compare = _Comparison(subjects)
    return _best_draw(draw, lambda fold: [compare(fold == i) for i in range(k)], settings, "folds")


def make_split(rows: pd.DataFrame, column: str, task: str, settings: Split) -> SplitResult:
    subjects = subject_table(rows, column, task, settings.bins)
    rng = np.random.default_rng(settings.seed)
    draws = []
    if settings.n_test > 0:
        held, draw = _hold_out(subjects, settings.n_test, settings, rng, "test")
        draws.append(draw)
    else:
        held = np.zeros(len(subjects), dtype=bool)
    test = sorted(subjects.index[held])
    rest = subjects[~held]
    if len(rest) < 2:
        raise UsageError(f"only {len(rest)} subject(s) left after the test set; lower [split] n_test")
    if settings.n_splits >= 2:
        fold, draw = _folds(rest, settings.n_splits, settings, rng, task == "classification")
        folds = [sorted(rest.index[fold == i]) for i in range(settings.n_splits)]
    else:
        held_validation, draw = _hold_out(rest, settings.n_validation, settings, rng, "validation")
        folds = [sorted(rest.index[held_validation])]
    draws.append(draw)
    for each in draws:
        if not each.met:
            log.warning(
                "%s: no draw in %d met p_age >= %.2f and p_sex >= %.2f; keeping the best one found (%s)",
                each.name, each.attempts, settings.p_age, settings.p_sex, each.describe())
    return SplitResult(test, folds, draws)


def select(rows: pd.DataFrame, participants: list[str]) -> pd.DataFrame:
    return rows[rows.participant_id.isin(participants)].sort_values(KEYS).reset_index(drop=True)


def in_session_order(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by participant, then by the acquisition times of sessions.tsv where every session of the participant
    has one (named sessions such as ses-pre and ses-post say nothing by their names), then by label
    (caps.session_order: ses-9 before ses-10)."""
    keys = rows[KEYS].reset_index(drop=True)
    keys["session_id"] = keys.session_id.astype(str).map(session_order)
    if ACQ_TIME in rows:
        times = acq_times(rows[ACQ_TIME].reset_index(drop=True))
        complete = times.notna().groupby(keys.participant_id).transform("all")
        keys[ACQ_TIME] = times.where(complete).fillna(pd.Timestamp(0, tz="UTC"))
    columns = ["participant_id", *([ACQ_TIME] if ACQ_TIME in keys else []), "session_id"]
    return rows.iloc[keys.sort_values(columns, kind="stable").index]


def baseline(rows: pd.DataFrame) -> pd.DataFrame:
    """Each participant's first session."""
    return in_session_order(rows).groupby("participant_id", sort=True).head(1).reset_index(drop=True)


def population(sets: dict[str, pd.DataFrame], column: str, task: str) -> pd.DataFrame:
    """Counts, age and sex per set (and class), for the population report."""
    records = []
    for name, rows in sets.items():
        groups = rows.groupby(column, sort=True) if task == "classification" else [("all", rows)]
        for label, group in groups:
            first = baseline(group)
            record = {"set": name, "label": label, "participants": first.participant_id.nunique(),
                      "sessions": len(group)}
            if "age" in group:
                record.update(age_mean=round(float(first.age.mean()), 2), age_sd=round(float(first.age.std()), 2))
            if "sex" in group:
                counts = first.sex.value_counts()
                record.update(female=int(counts.get("F", 0)), male=int(counts.get("M", 0)))
            if task == "regression":
                record.update(label_mean=round(float(group[column].mean()), 3),
                              label_sd=round(float(group[column].std()), 3))
            records.append(record)
    return pd.DataFrame(records)
