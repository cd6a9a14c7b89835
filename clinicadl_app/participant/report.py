"""Per-participant QC report (reports/sub-X.html): one section per session, judged at a glance.

Built from the sidecar JSONs and the QC figures only, so it can be rebuilt at any time.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from clinicadl_app.core.atomic import write_text
from clinicadl_app.layouts.caps import Caps, CapsImage, session_order
from clinicadl_app.layouts.output import OutputLayout

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .8em;border:1px solid #ddd;text-align:left}
.pass{color:#fff;background:#2a7d2a;padding:.1em .5em;border-radius:3px}
.fail{color:#fff;background:#b22222;padding:.1em .5em;border-radius:3px}
img{max-width:100%;border:1px solid #333} .note{color:#555;font-size:.9em}
"""


def write_participant_report(layout: OutputLayout, caps: Caps, participant_id: str, images: list[CapsImage]) -> Path:
    out = layout.participant_report(participant_id)
    sections = [_session(layout, caps, image, out.parent) for image in sorted(
        images, key=lambda image: (session_order(image.session_id), image.prefix))]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{participant_id} - clinicadl-app QC</title>"
        f"<style>{_STYLE}</style></head><body><h1>{participant_id}: t1-linear quality check</h1>"
        "<p class='note'>Each picture shows the registered image in MNI152NLin2009cSym space. The red line is the "
        "template's brain outline and the cyan line its white-matter boundary: in a good registration they follow "
        "the brain's edge, the ventricles and the deep grey matter in all three planes.</p>"
        + "".join(sections)
        + "</body></html>"
    )
    write_text(out, page)
    return out


def _session(layout: OutputLayout, caps: Caps, image: CapsImage, report_dir: Path) -> str:
    title = f"<h2>{html.escape(image.participant_id)} {html.escape(image.session_id)}</h2>"
    try:
        sidecar = json.loads(caps.sidecar(image).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return title + "<p>No t1-linear record from clinicadl-app (image from another tool).</p>"
    qc = sidecar.get("QualityCheck", {})
    badge = "<span class='pass'>PASS</span>" if qc.get("passed") else "<span class='fail'>FAIL</span>"
    figure = layout.qc_figure(image)
    picture = (
        f"<img src='{html.escape(os.path.relpath(figure, report_dir))}' alt='registration overlay'>"
        if figure.exists() else "<p>No figure.</p>"
    )
    rows = {
        "Quality check": badge,
        "Correlation with template in brain": f"{qc.get('correlation', float('nan')):.3f} "
        f"(threshold {qc.get('threshold', float('nan')):.2f})",
        "Normalised mutual information": f"{qc.get('nmi', float('nan')):.3f}",
        "Source": html.escape(str(sidecar.get("Sources", [""])[0])),
        "Registration retried with rotation search": "yes" if sidecar.get("RegistrationRetried") else "no",
        "Seconds per step": html.escape(
            ", ".join(f"{k} {v:.1f}" for k, v in sidecar.get("Timings", {}).items())
        ),
        "Software": html.escape(", ".join(f"{k} {v}" for k, v in sidecar.get("Software", {}).items())),
    }
    table = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows.items()) + "</table>"
    return title + table + picture
