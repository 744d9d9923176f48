"""One self-contained HTML report of a run directory (images embedded, no network).

Sections (`celldino.report.sections`): data and QC summary, training curves and collapse
diagnostics, UMAPs, evaluation tables with the baselines side by side (best value marked),
attention maps and patch maps. Each reads the run directory through the same `celldino.io`
functions the stages write with, at the paths `celldino.io.runlayout.RunLayout` names. A section
whose inputs are missing says which stage makes them; one that fails shows its error without
losing the others. The HTML itself (`celldino.report.html`) escapes every piece of metadata.
"""

from celldino.report.build import build_report
from celldino.report.html import Section, best_per_row, html_table

__all__ = ["Section", "best_per_row", "build_report", "html_table"]
