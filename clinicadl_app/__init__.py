"""clinicadl-app: a BIDS App for reproducible, leakage-free deep learning on brain MRI."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("clinicadl-app")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = (Path(__file__).resolve().parents[1] / "version").read_text().strip()
