"""Self-contained HTML pages in one style (MAPS report, search summary): tables, inlined figures, a page."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clinicadl_app.core.figures import png_data_uri

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:2px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{padding:.25em .7em;border:1px solid #ddd}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%} figure{display:inline-block;margin:.5em;vertical-align:top} figcaption{font-size:.85em;color:#555}
details{margin:.5em 0} summary{cursor:pointer;font-weight:600} .note{color:#555;font-size:.9em}
"""


def figure_uri(fig) -> str:
    return png_data_uri(fig, dpi=80, bbox_inches="tight")


def file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def img(uri: str, caption: str) -> str:
    text = html.escape(caption)
    return f"<figure><img src='{uri}' alt='{text}'><figcaption>{text}</figcaption></figure>"


def table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float | np.floating):
                cells.append(f"<td class='n'>{'' if math.isnan(value) else f'{value:.3f}'}</td>")
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
            f" - clinicadl-app report</title><style>{STYLE}</style></head><body>" + "".join(body) + "</body></html>")
