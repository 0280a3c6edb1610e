"""A self-contained HTML page built section by section: text, tables and PNG figures embedded as base64."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from trainable.data.nih import write_text_atomically

from .effects import EQUIVALENT, HELPS, HURTS, INCONCLUSIVE
from .palette import GREY, VERDICT_COLOURS, tint

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.not-estimable, .provisional { color: %(grey)s; }
.warning { border-left: 4px solid %(undecided)s; background: %(undecided_tint)s; padding: 0.6em 1em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%%; }
""" % {"grey": GREY, "undecided": VERDICT_COLOURS[INCONCLUSIVE],
       "undecided_tint": tint(VERDICT_COLOURS[INCONCLUSIVE], 0.1)}
# Row tints in the palette's verdict colours (light enough for black text).
STYLE += "".join(f".{verdict} {{ background: {tint(VERDICT_COLOURS[verdict])}; }}\n"
                 for verdict in (HELPS, HURTS, EQUIVALENT))

VERDICT_CLASSES = {"helps": "helps", "hurts": "hurts", "equivalent": "equivalent", "not estimable": "not-estimable",
                   "provisional": "provisional"}


class HtmlReport:
    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str) -> "HtmlReport":
        self._parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def paragraph(self, text: str, *, warning: bool = False) -> "HtmlReport":
        css = ' class="warning"' if warning else ""
        self._parts.append(f"<p{css}>{html.escape(text)}</p>")
        return self

    def items(self, lines: list[str]) -> "HtmlReport":
        if lines:
            self._parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
        return self

    def code(self, text: str) -> "HtmlReport":
        self._parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def figure(self, png: bytes, alt: str) -> "HtmlReport":
        data = base64.b64encode(png).decode("ascii")
        self._parts.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        return self

    def table(self, frame: pd.DataFrame, *, verdict_column: str | None = None, collapsed: str | None = None,
              float_format: str = "{:.4f}") -> "HtmlReport":
        """A table; rows tinted by their verdict (helps / hurts / equivalent; not estimable and provisional rows
        grey) when `verdict_column` names one."""
        header = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = []
        for _, row in frame.iterrows():
            verdict = str(row[verdict_column]) if verdict_column else ""
            if verdict_column and bool(row.get("provisional", False)):
                verdict = "provisional"
            css = f' class="{VERDICT_CLASSES[verdict]}"' if verdict in VERDICT_CLASSES else ""
            cells = "".join(f"<td>{html.escape(_cell(value, float_format))}</td>" for value in row)
            body.append(f"<tr{css}>{cells}</tr>")
        table = f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        if collapsed:
            table = f"<details><summary>{html.escape(collapsed)}</summary>{table}</details>"
        self._parts.append(table)
        return self

    def render(self) -> str:
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head>\n"
                f"<body><h1>{html.escape(self.title)}</h1>\n" + "\n".join(self._parts) + "\n</body></html>\n")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomically(path, self.render())
        return path


def _cell(value, float_format: str) -> str:
    if isinstance(value, float):
        return "—" if value != value else float_format.format(value)
    return str(value)
