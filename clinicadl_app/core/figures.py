"""Figures on machines without a display (clusters, containers): one place that picks the Agg backend and
saves a PNG atomically, so a killed run never leaves a half-written picture a report would embed."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType

from clinicadl_app.core.atomic import atomic_path


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, **options) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **options)
    pyplot().close(fig)


def png_data_uri(fig, **options) -> str:
    """The figure inlined as a data URI (self-contained HTML)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **options)
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
