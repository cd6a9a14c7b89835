"""Participant-level image processing: t1-linear and its quality check."""
