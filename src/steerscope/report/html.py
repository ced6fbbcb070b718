"""A small self-contained HTML report: headings, paragraphs, tables, figures (inline PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

from steerscope._files import atomic_write

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}pre{background:#f7f7f7;padding:8px;white-space:pre-wrap}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}.note{color:#555}"""


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return html.escape(str(x))


class Report:
    """Accumulate sections, then :meth:`write` one HTML file.

    Example:
        >>> r = Report("Refusal study")
        >>> r.table(["method", "ASR"], [["DIM", 0.8]])
        >>> r.write("runs/refusal/report.html")
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def h3(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def p(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
        th = "".join(f'<th class="l">{_fmt(h)}</th>' if i == 0 else f"<th>{_fmt(h)}</th>" for i, h in enumerate(header))
        body = "".join(
            "<tr>" + "".join(f'<td class="l">{_fmt(c)}</td>' if i == 0 else f"<td>{_fmt(c)}</td>" for i, c in enumerate(r))
            + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<tr>{th}</tr>{body}</table>")

    def figure(self, fig: Any, caption: str = "", save_as: str | Path | None = None) -> None:
        """Embed a matplotlib figure as inline PNG (and save it beside the report if asked)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        if save_as is not None:
            atomic_write(Path(save_as), buf.getvalue())
        import matplotlib.pyplot as plt

        plt.close(fig)
        b64 = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(f'<figure><img src="data:image/png;base64,{b64}"/><figcaption>{html.escape(caption)}'
                          "</figcaption></figure>")

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")
        atomic_write(path, doc.encode("utf-8"))  # a symlink at path is replaced, never followed
        return path


def plt_figure(*args: Any, **kw: Any) -> Any:
    """A matplotlib figure on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(*args, **kw)
