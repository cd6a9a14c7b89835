#!/usr/bin/env python3
"""BIDS App entry point: run.py BIDS_DIR OUTPUT_DIR {participant,group} [options]."""

import sys

from clinicadl_app.cli import run

if __name__ == "__main__":
    sys.exit(run())
