"""The nightly report shown: a compact table on the terminal, and its files in `--out DIR` (a
folder or URL): report.json, the two plots, and with --html one static page that holds them all
(its images inline, so it can be mailed or served as one file)."""

from __future__ import annotations

import base64
import html
import json

from . import storage
from .plots import plot_histograms, plot_nights
from .report import Comparison, RunReport, TableReport

REPORT_JSON, NIGHTS_PNG, SCORES_PNG, REPORT_HTML = "report.json", "nights.png", "scores.png", "report.html"


def run_cells(run: RunReport) -> dict[str, str]:
    """A run's figures as the table and the page show them ("-": not known)."""
    record = run.record

    def shown(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    return {"run": record.run_id, "committed (UTC)": f"{record.committed:%Y-%m-%d %H:%M}", "rows": f"{record.rows:,}",
            "files": str(record.files_scored), "failed": str(len(record.files_failed)),
            "skipped": str(record.files_skipped), "share": shown(record.positive_share, ".2%"),
            "change": shown(run.share_change, "+.2%"), "PSI": shown(run.psi, ".3f"),
            "rows/s": f"{record.rows_per_second:,.0f}", "model": record.model_version, "precision": record.precision,
            "threshold": shown(record.threshold, ".4f")}


def format_report(result: TableReport) -> str:
    """A compact table, a run a line."""
    header = (f"{'run':<26} {'committed (UTC)':<16} {'rows':>9} {'files':>5} {'failed':>6} {'skipped':>7} "
              f"{result.positive + ' share':>12} {'change':>8} {'PSI':>6} {'rows/s':>8}  model / precision / threshold")
    lines = [f"{result.table}: {len(result.runs)} run(s); drift against {result.reference.record.run_id}", header]
    for run in result.runs:
        record, c = run.record, run_cells(run)
        lines.append(f"{c['run']:<26} {c['committed (UTC)']} {c['rows']:>9} {c['files']:>5} {c['failed']:>6} "
                     f"{c['skipped']:>7} {c['share']:>12} {c['change']:>8} {c['PSI']:>6} {c['rows/s']:>8}  "
                     f"{c['model']} / {c['precision']} / {c['threshold']}")
        if run.comparison is not None:
            lines.append(f"{'':<26} shadow of {record.in_use_version}: {describe_comparison(run.comparison, result.positive)}")
    return "\n".join(lines)


def describe_comparison(comparison: Comparison, positive: str) -> str:
    if not comparison.rows:
        return "no rows held to compare"
    return (f"agrees on {comparison.agreement:.2%} of {comparison.rows:,} rows; flips to {positive} "
            f"{comparison.to_positive:,}, away from {positive} {comparison.to_negative:,}; the model in use's "
            f"{positive} share {comparison.in_use_share:.2%}")


def plots(result: TableReport) -> dict[str, bytes]:
    """Volume and spam share over the runs; the latest run's score histogram over the reference's."""
    records = [run.record for run in result.runs]
    latest = result.runs[-1]
    return {
        NIGHTS_PNG: plot_nights([r.committed for r in records], [r.rows for r in records],
                                [r.positive_share for r in records], [len(r.files_failed) for r in records],
                                result.positive),
        SCORES_PNG: plot_histograms(latest.histogram, result.reference.histogram, latest.record.run_id,
                                    result.reference.record.run_id, result.positive, latest.psi),
    }


def write_report(result: TableReport, out: str, page: bool) -> list[str]:
    """Writes the report's files into `out`; returns their URLs. Each file is written whole (an
    object store's PUT, a local rename), so a reader never sees half of one."""
    files = {REPORT_JSON: json.dumps(result.to_json(), indent=1).encode(), **plots(result)}
    if page:
        files[REPORT_HTML] = html_page(result, files).encode()
    urls = []
    for name, data in files.items():
        urls.append(storage.join(out, name))
        storage.write_bytes(urls[-1], data)
    return urls


def html_page(result: TableReport, files: dict[str, bytes]) -> str:
    def image(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(files[name]).decode()}">'

    columns = [name if name != "share" else f"{result.positive} share" for name in run_cells(result.reference)]
    shadow = any(run.comparison is not None for run in result.runs)
    if shadow:
        columns += ["in use", "agreement", f"flips to {result.positive}", f"flips from {result.positive}",
                    f"in use's {result.positive} share"]
    rows = []
    for run in result.runs:
        record = run.record
        cells = list(run_cells(run).values())
        if shadow:
            compared = run.comparison
            cells += [record.in_use_version or "-"] + (["-"] * 4 if compared is None or not compared.rows else [
                f"{compared.agreement:.2%}", compared.to_positive, compared.to_negative, f"{compared.in_use_share:.2%}"])
        failed = ' class="failed"' if record.files_failed else ""
        rows.append(f"<tr{failed}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    failures = [f"<li>{html.escape(run.record.run_id)}: {html.escape(url)}: {html.escape(why)}</li>"
                for run in result.runs for url, why in run.record.files_failed.items()]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>spamray report: {html.escape(result.table)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} tr.failed td{{background:#fdd}}</style></head>
<body><h1>spamray report</h1>
<p>{html.escape(result.table)}: {len(result.runs)} run(s); drift against {html.escape(result.reference.record.run_id)}</p>
{image(NIGHTS_PNG)}
{image(SCORES_PNG)}
<table><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in columns)}</tr>
{chr(10).join(rows)}
</table>
<h2>Failed files</h2><ul>{"".join(failures) or "<li>none</li>"}</ul>
</body></html>
"""
