"""Utilities every level uses: settings, errors and exit codes, atomic writes, logs, provenance, figures."""
