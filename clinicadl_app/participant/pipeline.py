"""Participant level: each selected T1w scan -> t1-linear in the CAPS -> tensors, in parallel, resumable.

Sessions are independent jobs. A job's outputs are written atomically, the cropped image last, so its
presence means the session is complete; a rerun skips it unless --overwrite. Shared files (dataset
descriptions, the QC table, extraction JSONs) are written under a lock or with identical content, so
several invocations (cluster array jobs) can write into one OUTPUT_DIR at the same time. A session is
processed under its own lock (released by the kernel if the job is killed): a job that finds a session taken
waits, then skips it if the other job completed it, so two jobs given one subject never both process it.
Worker processes die with their job (a cancelled SLURM task leaves no orphan registering on).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from clinicadl_app.core.atomic import atomic_path, lock, write_json, write_text, write_tsv
from clinicadl_app.core.config import Config
from clinicadl_app.core.errors import AppError, ExitCode, OutputError
from clinicadl_app.core.logs import log_to_console, log_to_file
from clinicadl_app.core.provenance import sha256, software_versions
from clinicadl_app.images.extraction import extract, prepare_masks, write_descriptions
from clinicadl_app.layouts.bids import SESSIONLESS, T1wScan, find_t1w, normalise_labels, read_filters
from clinicadl_app.layouts.caps import Caps, CapsImage
from clinicadl_app.layouts.output import OutputLayout
from clinicadl_app.participant.bids_validator import validate_bids
from clinicadl_app.participant.report import write_participant_report

log = logging.getLogger("clinicadl_app")

Status = Literal["done", "complete", "failed"]


@dataclass(frozen=True)
class Job:
    scan: T1wScan
    image: CapsImage
    preprocess: bool
    """False when the CAPS already holds this session's t1-linear image (ours, or Clinica's)."""


@dataclass
class Outcome:
    job: Job
    status: Status
    message: str = ""
    tensors: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def run(config: Config) -> ExitCode:
    execution = config.execution
    layout = OutputLayout(config.output_dir)
    layout.prepare(config.bids_dir)
    log_file = layout.run_record("participant", ".log")
    log_to_file(log_file)
    if not execution.skip_bids_validator:
        validate_bids(config.bids_dir)

    participants = normalise_labels(execution.participant_label, "sub")
    sessions = normalise_labels(execution.session_label, "ses")
    selection = find_t1w(config.bids_dir, participants, sessions, read_filters(execution.bids_filter_file))
    caps = Caps(config.caps_dir)
    try:
        caps.root.mkdir(parents=True, exist_ok=True)
        caps.write_description(config.bids_dir)
    except OSError as error:
        raise OutputError(f"{caps.root}: cannot write the CAPS ({error.strerror}); check --caps_dir") from None
    prepare_masks(caps, config.extraction)
    write_descriptions(caps, config.extraction)
    write_text(layout.run_record("participant", ".toml"), config.to_toml())

    jobs = plan_jobs(config, caps, selection.scans)
    todo = sum(job.preprocess for job in jobs)
    log.info("%d sessions selected: %d to preprocess, %d already in the CAPS", len(jobs), todo, len(jobs) - todo)
    outcomes = run_jobs(jobs, config, log_file)

    for participant_id in sorted({o.job.image.participant_id for o in outcomes if o.status != "failed"}):
        # every completed session in the CAPS, also those that other jobs (one array task per session) wrote;
        # under a lock, so that the last job to finish lists them all
        with lock(layout.participant_report(participant_id)):
            images, _ = caps.index(participants=(participant_id[4:],))
            write_participant_report(layout, caps, participant_id, images)
    update_qc_table(caps)
    log.info("quality-check pages: %s (one per participant); CAPS: %s", layout.reports_dir / "sub-*.html", caps.root)
    return summarise(outcomes, selection.skipped)  # last: the summary, and who failed


def plan_jobs(config: Config, caps: Caps, scans: list[T1wScan]) -> list[Job]:
    participants = tuple(sorted({scan.participant for scan in scans}))
    existing, _ = caps.index(participants)
    present = {(image.participant_id, image.session_id): image for image in existing}
    jobs = []
    for scan in scans:
        image = present.get((scan.participant_id, scan.session_id))
        if image is None:
            jobs.append(Job(scan, caps.image_for(scan), preprocess=True))
            continue
        ours = _is_ours(caps, image)
        wants_uncropped = config.preprocessing.uncropped_image and not caps.t1_linear(image, cropped=False).exists()
        redo = ours and (config.execution.overwrite or wants_uncropped)
        if not ours and config.execution.overwrite:
            log.info("%s: t1-linear image made by another tool; kept as is (not overwritten)", image.name)
        jobs.append(Job(scan, image, preprocess=redo))
    return jobs


def _is_ours(caps: Caps, image: CapsImage) -> bool:
    try:
        return json.loads(caps.sidecar(image).read_text()).get("GeneratedBy", {}).get("Name") == "clinicadl-app"
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return False


def run_jobs(jobs: list[Job], config: Config, log_file: Path | None = None) -> list[Outcome]:
    """Process jobs in worker processes; a worker that dies (out of memory) fails its job only."""
    if not jobs:
        return []
    cpus = config.execution.cpus
    workers = max(1, min(cpus, len(jobs)))
    threads = max(1, cpus // workers)
    outcomes: dict[Job, Outcome] = {}
    pending = list(jobs)
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="participant", unit="session", disable=None) as progress:
        while pending:
            context = multiprocessing.get_context("spawn")
            init = (threads, log.level, log_file, os.getpid())
            with ProcessPoolExecutor(workers, context, _init_worker, init) as pool:
                futures: dict[Future[Outcome], Job] = {pool.submit(process, job, config): job for job in pending}
                try:
                    for future in as_completed(futures):
                        outcome = future.result()
                        outcomes[outcome.job] = outcome
                        _report(outcome)
                        progress.update()
                except BrokenProcessPool:
                    pass
            broken = [job for job in pending if job not in outcomes]
            if broken:
                # the pool died with several jobs in flight: retry them one at a time to find the culprit
                first = broken[0]
                if workers == 1:
                    outcomes[first] = Outcome(first, "failed", "the worker process died (out of memory?); "
                                              "rerun this participant alone or with fewer --n_cpus")
                    _report(outcomes[first])
                    progress.update()
                workers = 1
                threads = cpus
            pending = [job for job in pending if job not in outcomes]
    return [outcomes[job] for job in jobs]


def _init_worker(threads: int, level: int, log_file: Path | None, parent: int) -> None:
    _die_with_parent(parent)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    log_to_console(level)
    if log_file:
        log_to_file(log_file)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the job's main process dies, even by SIGKILL.

    `parent` is the job's pid, not 1: in a container the job itself is pid 1.
    """
    import ctypes
    import signal
    from contextlib import suppress

    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def process(job: Job, config: Config) -> Outcome:
    """One session, start to finish; every error becomes a failed Outcome naming the file and the fix."""
    start = time.perf_counter()
    caps = Caps(config.caps_dir)
    with lock(caps.root / ".locks" / job.image.name, timeout=-1):  # another job on this session: wait for it
        todo = job
        if job.preprocess and not config.execution.overwrite and caps.t1_linear(job.image).exists():
            todo = Job(job.scan, job.image, preprocess=False)  # completed by another job while we waited
        outcome = _process(todo, config, caps)
    outcome.job, outcome.seconds = job, time.perf_counter() - start
    return outcome


def _process(job: Job, config: Config, caps: Caps) -> Outcome:
    outcome = Outcome(job, "complete")
    try:
        if job.preprocess:
            outcome.timings = preprocess(job, config, caps)
            outcome.status = "done"
        outcome.tensors = extract(caps, job.image, config.extraction, overwrite=config.execution.overwrite)
        if outcome.tensors:
            outcome.status = "done"
        quality = caps.quality(job.image)
        if quality and not quality.get("passed", True):
            outcome.message = (f"registration failed the quality check (r {quality['correlation']:.3f} < "
                               f"{quality['threshold']:.2f}); kept in the CAPS, left out by the labels stage")
    except AppError as error:
        outcome.status, outcome.message = "failed", error.message
    except OSError as error:
        where = error.filename or config.caps_dir
        outcome.status = "failed"
        outcome.message = f"{where}: {error.strerror or error}; free disk space or fix permissions, then rerun"
    except Exception as error:  # noqa: BLE001 - a bug must not stop the other subjects
        log.debug("%s", traceback.format_exc())
        outcome.status = "failed"
        outcome.message = f"unexpected {type(error).__name__}: {error} (a bug: please report it with the log)"
    return outcome


def preprocess(job: Job, config: Config, caps: Caps) -> dict[str, float]:
    import nibabel as nib

    from clinicadl_app.images.templates import CROP, MNI_T1, cropped_affine, path
    from clinicadl_app.participant.qc import qc_figure
    from clinicadl_app.participant.t1_linear import run_t1_linear

    settings = config.preprocessing
    image = job.image
    work = config.execution.work_dir
    if work:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{image.prefix}-", dir=work) as tmp:
        result = run_t1_linear(job.scan.path, Path(tmp), settings.seed, settings.qc_threshold)
        template = nib.load(str(path(MNI_T1)))
        with atomic_path(caps.transform(image)) as out:
            out.write_bytes(result.transform.read_bytes())
    if settings.uncropped_image:
        _save_nifti(result.image, template.affine, template.header, caps.t1_linear(image, cropped=False))
    with atomic_path(OutputLayout(config.output_dir).qc_figure(image)) as out:
        qc_figure(result.image, out, f"{image.name}  r={result.qc.correlation:.3f}  "
                  f"{'PASS' if result.qc.passed else 'FAIL'}")
    write_json(caps.sidecar(image), {
        "GeneratedBy": {"Name": "clinicadl-app", "Pipeline": "t1-linear"},
        "Sources": [str(job.scan.path)],
        "SourceSHA256": sha256(job.scan.path),
        "SessionLabelInBIDS": job.scan.session,
        "SessionLabelNote": None if job.scan.session else f"dataset without sessions: ses-{SESSIONLESS} used",
        "SkullStripped": False,
        "Resolution": "1x1x1",
        "SpatialReference": "MNI152NLin2009cSym",
        "Crop": {"Box": [[CROP[0].start, CROP[0].stop], [CROP[1].start, CROP[1].stop],
                         [CROP[2].start, CROP[2].stop]], "Shape": list(result.cropped.shape)},
        # ANTs is not bit-reproducible (docs/design.md: reruns differ by up to ~0.2 mm, whatever the threads)
        "Parameters": {"seed": settings.seed, "qc_threshold": settings.qc_threshold,
                       "threads": int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "0")) or None},
        "QualityCheck": result.qc.as_dict(),
        "RegistrationRetried": result.retried,
        "Timings": {k: round(v, 2) for k, v in result.timings.items()},
        "Software": software_versions(),
    })
    # last: the cropped image's presence marks the session as complete
    _save_nifti(result.cropped, cropped_affine(template.affine), template.header, caps.t1_linear(image))
    return result.timings


def _save_nifti(data, affine, header, out: Path) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(data.astype(np.float32), affine, header.copy())
    img.set_data_dtype(np.float32)
    img.header["descrip"] = b"clinicadl-app t1-linear"
    with atomic_path(out) as tmp:
        nib.save(img, str(tmp))


def update_qc_table(caps: Caps) -> Path:
    """Rebuild the dataset's QC table from every sidecar (self-healing after a killed run)."""
    rows = []
    for sidecar in sorted((caps.root / "subjects").glob("sub-*/ses-*/t1_linear/*_desc-Crop_res-1x1x1_T1w.json")):
        try:
            data = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            continue
        qc = data.get("QualityCheck")
        if not qc:
            continue
        rows.append({
            "participant_id": sidecar.parts[-4], "session_id": sidecar.parts[-3],
            "image": sidecar.name.replace(".json", ".nii.gz"), "correlation": qc["correlation"],
            "nmi": qc["nmi"], "threshold": qc["threshold"], "pass": bool(qc["passed"]),
            "retried": bool(data.get("RegistrationRetried")),
        })
    with lock(caps.qc_table):
        write_tsv(caps.qc_table, pd.DataFrame(rows, columns=[
            "participant_id", "session_id", "image", "correlation", "nmi", "threshold", "pass", "retried"]))
    return caps.qc_table


def _report(outcome: Outcome) -> None:
    name = outcome.job.image.name
    if outcome.status == "failed":
        log.error("%s: %s", name, outcome.message)
    elif outcome.status == "done":
        log.info("%s: done in %.0f s (%d tensors written)", name, outcome.seconds, outcome.tensors)
    else:
        log.info("%s: already complete", name)
    if outcome.status != "failed" and outcome.message:
        log.warning("%s: %s", name, outcome.message)


def summarise(outcomes: list[Outcome], skipped: list[str]) -> ExitCode:
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    complete = sum(o.status == "complete" for o in outcomes)
    log.info("participant level: %d done, %d already complete, %d failed, %d skipped",
             done, complete, len(failed), len(skipped))
    qc_failed = [o.job.image.name for o in outcomes if o.status != "failed" and o.message]
    if qc_failed:
        log.warning("%d session(s) failed the registration quality check (see reports/ and caps/qc/): %s",
                    len(qc_failed), ", ".join(qc_failed))
    if failed or skipped:
        lines = [f"  {o.job.image.name}: {o.message}" for o in failed] + [f"  {line}" for line in skipped]
        log.error("%d session(s) did not complete:\n%s", len(lines), "\n".join(lines))
        return ExitCode.DATA_ERROR
    return ExitCode.OK


