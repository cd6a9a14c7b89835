"""Errors a user can cause, each with its exit code (BIDS execution spec draft + sysexits).

Anything that is not an `AppError` is a bug and ends with a traceback and exit code 1.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    VALIDATION_FAILED = 16
    UNKNOWN_LEVEL = 17
    NO_DATA = 18
    LEAKAGE = 20  # evaluation or transfer would use data a model was trained or selected on
    NOT_REPRODUCED = 21  # --reproduce drew another split than the recorded one
    USAGE = 64
    DATA_ERROR = 65  # some subjects (or images) failed; the run prints who and why
    MISSING_INPUT = 66
    CANNOT_WRITE = 73
    PEER_LOST = 75  # sysexits EX_TEMPFAIL: a distributed training lost a process; a rerun resumes


MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.VALIDATION_FAILED: "the BIDS validator found errors (--skip_bids_validator bypasses it)",
    ExitCode.UNKNOWN_LEVEL: "unknown analysis level",
    ExitCode.NO_DATA: "the filters selected no data",
    ExitCode.LEAKAGE: "leakage: evaluating on (or transferring from) data a model was trained or selected on",
    ExitCode.NOT_REPRODUCED: "--reproduce: the split drawn again differs from the recorded one (other labels "
                             "or images); reproduction.md says how",
    ExitCode.USAGE: "usage error: bad option, label, configuration file or ROI mask",
    ExitCode.DATA_ERROR: "some sessions failed; the log ends with who failed and why, the others completed",
    ExitCode.MISSING_INPUT: "missing input: BIDS folder, configuration, filter file or MAPS",
    ExitCode.CANNOT_WRITE: "the output folder cannot be written or the disk is full (rerun to resume)",
    ExitCode.PEER_LOST: "distributed training: another process died or could not be reached (rerun to resume "
                        "from the last completed epoch, on any number of processes)",
}
"""What each exit code means, for the README, the Boutiques descriptor and platforms."""


class AppError(Exception):
    """An error the user can fix; printed as one line, never as a traceback."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(AppError):
    exit_code = ExitCode.USAGE


class UnknownLevelError(AppError):
    exit_code = ExitCode.UNKNOWN_LEVEL


class ValidationFailed(AppError):
    exit_code = ExitCode.VALIDATION_FAILED


class LeakageError(AppError):
    """Data seen in training would be used for evaluation (or a transfer source saw a test subject)."""

    exit_code = ExitCode.LEAKAGE


class ReproductionError(AppError):
    """A MAPS cannot be reproduced from this data: the split drawn again is not the recorded one."""

    exit_code = ExitCode.NOT_REPRODUCED


class NoDataError(AppError):
    exit_code = ExitCode.NO_DATA


class MissingInputError(AppError):
    exit_code = ExitCode.MISSING_INPUT


class InputDataError(AppError):
    """An input file exists but cannot be used (corrupt, wrong dimensionality, NaNs...)."""

    exit_code = ExitCode.DATA_ERROR


class OutputError(AppError):
    exit_code = ExitCode.CANNOT_WRITE

    @classmethod
    def cannot_write(cls, path: object, reason: object) -> OutputError:
        """A write that failed for want of space (or quota, or a read-only disk): what to do about it."""
        return cls(f"cannot write {path} ({reason}); free some space on that disk (or point the output elsewhere) "
                   "and run again: finished outputs are kept and the run resumes")
