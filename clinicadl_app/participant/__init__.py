"""Participant level: BIDS T1w scans -> t1-linear CAPS images, QC and tensors, one session per job."""

from clinicadl_app.participant.pipeline import run

__all__ = ["run"]
