"""Group level: CAPS -> labels and splits -> MAPS (train, predict, interpret) -> report.

Library modules here (data, networks, tasks, training, ...) serve the stages in stages/; a stage never
imports another stage, and pipeline.py runs them in order.
"""

from clinicadl_app.group.pipeline import run

__all__ = ["run"]
