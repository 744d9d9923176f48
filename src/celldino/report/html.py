"""The HTML of the report: a `Section` collects escaped fragments (text, figures as data URIs,
tables with the best value of each row marked) and `render_html` joins them into one page.

Every piece of metadata text is HTML-escaped, so a plate named `<script>` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from celldino.pl.figure import close

# Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = {
    "p_value",
    "q_value",
    "loss",
    "plate_dominates",
    "plate_minus_treatment",
    "plate_agreement",
}
# Rows that are a baseline or a setting, not a score: no best is marked.
NOT_A_SCORE = (
    "null_",
    "permuted_",
    "chance",
    "plate_chance",
    "treatment_chance",
    "margin",
    "seed",
    "plate_p_value",
)


@dataclass
class Section:
    id: str  # HTML id of the section (the report test looks for these)
    title: str  # heading shown to the reader
    parts: list[str] = field(default_factory=list)  # HTML fragments, already escaped

    def text(self, s: str) -> None:
        self.parts.append(f"<p>{html.escape(s)}</p>")

    def missing(self, what: str, stage: str) -> None:
        self.parts.append(
            f'<p class="missing">No {html.escape(what)} found: run <code>{html.escape(stage)}</code> first.</p>'
        )

    def figure(self, fig: Figure, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(
        self,
        df: pd.DataFrame,
        *,
        best: dict[str, str | list[str]] | None = None,
        caption: str = "",
        sortable: bool = False,
    ) -> None:
        self.parts.append(html_table(df, best=best, caption=caption, sortable=sortable))

    def warn(self, s: str) -> None:
        self.parts.append(f'<p class="warn">⚠ {html.escape(s)}</p>')

    def details(self, summary: str, body: str) -> None:
        """A collapsed block (`<details>`): `body` is HTML already escaped."""
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary>\n{body}\n</details>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def html(self) -> str:
        body = "\n".join(self.parts) or "<p>(empty)</p>"
        return f'<section id="{self.id}"><h2>{html.escape(self.title)}</h2>\n{body}\n</section>'


def _fmt(v: object, count: bool = False) -> str:
    """A cell's text: counts (and whole numbers in a count row or column) as integers, other
    floats with 3 decimals (3 significant digits below 0.001), NaN as '–'."""
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "–"
        if count and float(v).is_integer():
            return str(int(v))
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def html_table(
    df: pd.DataFrame,
    *,
    best: dict[str, str | list[str]] | None = None,
    caption: str = "",
    sortable: bool = False,
) -> str:
    """An escaped HTML table; cells named in `best` ({row label: column or columns}) get class
    'best'.

    Values in a row or column named as a count (`n_…`, `…_n`, `count`, `…_index`) print as
    integers; `sortable` tables sort by a column when its header is clicked.
    """
    best = best or {}
    head = "".join(
        f"<th>{html.escape(str(c))}</th>" for c in [df.index.name or ""] + list(df.columns)
    )
    count_cols = {str(c) for c in df.columns if _is_count(str(c))}
    rows = []
    for idx, row in df.iterrows():
        cells = [f"<th>{html.escape(str(idx))}</th>"]
        count_row = _is_count(str(idx))
        for col, v in row.items():
            b = best.get(str(idx))
            hit = str(col) == b if isinstance(b, str) else str(col) in (b or ())
            cls = ' class="best"' if hit else ""
            mark = " ★" if cls else ""
            text = _fmt(v, count_row or str(col) in count_cols)
            cells.append(f"<td{cls}>{html.escape(text)}{mark}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    attr = ' class="sortable"' if sortable else ""
    return f"<table{attr}>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _is_count(label: str) -> bool:
    name = label.rsplit(":", 1)[-1].strip().lower()
    return (
        name.startswith("n_")
        or name.endswith("_n")
        or name.endswith("_index")
        or name in ("count", "n", "k", "n_queries")
    )


def best_per_row(wide: pd.DataFrame) -> dict[str, str | list[str]]:
    """Column holding the best value of each row (max, or min for LOWER_IS_BETTER metrics); a
    list of the columns when several share the best value.

    Rows of counts (`n_groups`, `NSC_n`), of baselines and settings (`null_…`, `permuted_…`,
    `chance`, `margin`) and rows where every value ties have no best.
    """
    out = {}
    for idx, row in wide.iterrows():
        vals = pd.to_numeric(row, errors="coerce")
        metric = str(idx).rsplit(":", 1)[-1].strip()
        if vals.notna().sum() < 2 or _is_count(str(idx)) or vals.nunique() < 2:
            continue
        if metric.startswith(NOT_A_SCORE):
            continue
        lower = any(k in str(idx) for k in LOWER_IS_BETTER)
        top = vals.min() if lower else vals.max()
        cols = [str(c) for c, v in vals.items() if v == top]
        out[str(idx)] = cols[0] if len(cols) == 1 else cols
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem} h2{border-bottom:2px solid #e3e7ee;padding-bottom:.3rem;margin-top:2.4rem}
nav a{margin-right:1rem} figure{margin:1rem 0} img{max-width:100%;border:1px solid #e3e7ee}
figcaption{font-size:.85rem;color:#5b6478} table{border-collapse:collapse;margin:1rem 0;font-size:.88rem}
th,td{border:1px solid #d5dbe5;padding:.25rem .55rem;text-align:right} thead th{background:#f2f4f8}
tbody th{text-align:left;font-weight:600} td.best{background:#dff5e3;font-weight:700}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3rem 0} .missing{color:#a15c00}
.warn{background:#fff3d6;border-left:4px solid #e0a100;padding:.5rem .8rem} code{background:#f2f4f8;padding:0 .25rem}
details{margin:.4rem 0} summary{cursor:pointer;font-weight:600} pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;font-size:.8rem}
table.sortable thead th{cursor:pointer} table.sortable thead th:hover{background:#e3e7ee}
"""

# Click a header of a sortable table to sort its rows by that column (numbers as numbers);
# inline, so the report stays one file with no network.
SORT_JS = """
<script>
document.querySelectorAll('table.sortable').forEach(t => {
  t.querySelectorAll('thead th').forEach((th, i) => th.addEventListener('click', () => {
    const body = t.tBodies[0], rows = [...body.rows];
    const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    const key = r => { const s = r.cells[i].textContent.replace(' ★', '').trim();
                       const x = parseFloat(s); return isNaN(x) ? s : x; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      return (typeof x === typeof y ? (x > y) - (x < y) : (typeof x === 'number' ? -1 : 1)) * dir; });
    rows.forEach(r => body.appendChild(r));
  }));
});
</script>
"""


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(s.html() for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(subtitle)}</p><nav>{nav}</nav></header>\n{body}\n{SORT_JS}</body></html>\n"
    )
