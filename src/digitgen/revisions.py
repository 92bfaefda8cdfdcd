"""`digitgen compare`: Table 1's means at git revisions and DVC experiments beside the workspace's, CAE beside CVAE.

A DVC experiment is a git commit under refs/exps (its name is the ref's last part), so one code path reads both:
`git show <commit>:<pipeline>/results/table.csv`. The first revision is the base; every other column marks how far
it moved from it and whether that is better or worse (the direction of each metric: digitgen.evaluate.METRICS).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd

from digitgen.evaluate import METRICS
from digitgen.params import DigitgenError

TABLE = Path("results") / "table.csv"  # Table 1 as plain numbers, rows "CAE (8)", columns "<metric>_mean", ...
WORKSPACE = "workspace"
FAMILIES = ("CAE", "CVAE")  # the study's question, side by side; the other models are listed below
BETTER, WORSE = "▲", "▼"


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DigitgenError(done.stderr.strip() or f"git {' '.join(args)} failed")
    return done.stdout


def resolve(name: str, cwd: Path) -> str:
    """The commit of a git revision (HEAD, a branch, a tag, a SHA) or of a DVC experiment's name."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", cwd=cwd).strip()
    except DigitgenError:
        pass
    refs = _git("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", cwd=cwd).splitlines()
    found = [sha for ref, sha in (line.split() for line in refs) if ref.rsplit("/", 1)[-1] == name]
    if not found:
        raise DigitgenError(f"{name} is neither a git revision nor a DVC experiment (`dvc exp list` names them)")
    return found[0]


def read_table(revision: str, pipeline: Path) -> pd.DataFrame:
    """Table 1's numbers of the pipeline at a revision (WORKSPACE: the file on disk)."""
    path = Path(pipeline) / TABLE
    if revision == WORKSPACE:
        if not path.is_file():
            raise DigitgenError(f"{path} not found; run the pipeline (`uv run dvc repro`) first")
        return pd.read_csv(path, index_col=0)
    folder = path.parent if path.parent.is_dir() else Path.cwd()
    commit = resolve(revision, folder)
    try:
        text = _git("show", f"{commit}:./{path.name}", cwd=folder)
    except DigitgenError:
        raise DigitgenError(f"{revision} has no {path}") from None
    return pd.read_csv(io.StringIO(text), index_col=0)


def table1_metrics(table: pd.DataFrame) -> list[str]:
    """Table 1's metrics in its order: the columns <metric>_mean (not the paper's)."""
    return [c.removesuffix("_mean") for c in table.columns if c.endswith("_mean") and not c.endswith("_paper_mean")]


def _number(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.4g}"


def _cell(value: float, base: float, metric: str) -> str:
    """A value, and for a column other than the base its change from the base: relative, and better or worse."""
    if pd.isna(value) or pd.isna(base) or _number(value) == _number(base):
        return _number(value)
    change = (value - base) / abs(base) if base else float("inf")
    better = (value > base) == (METRICS.get(metric, "higher") == "higher")
    return f"{_number(value)} {change:+.1%}{BETTER if better else WORSE}"


def _latent(row: str) -> tuple[str, int]:
    family, _, size = row.rpartition(" (")
    return family, int(size.rstrip(")"))


def comparison(revisions: list[str], tables: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CAE against CVAE: a row per latent size and metric, a column per family and revision; and the other models
    (the label CVAE, the prior CVAE): a row per model and metric, a column per revision. The first revision is the
    base the others are marked against."""
    metrics = table1_metrics(tables[0])
    rows = sorted({row for table in tables for row in table.index}, key=lambda r: (_latent(r)[1], r))
    sizes = sorted({size for family, size in map(_latent, rows) if family in FAMILIES})

    def values(row: str, metric: str) -> list[str]:
        found = [t.at[row, f"{metric}_mean"] if row in t.index else float("nan") for t in tables]
        return [_cell(value, found[0], metric) if i else _number(value) for i, value in enumerate(found)]

    study = [
        {
            "latent": size,
            "metric": metric,
            **{
                f"{family} {r}": v
                for family in FAMILIES
                for r, v in zip(revisions, values(f"{family} ({size})", metric), strict=True)
            },
        }
        for size in sizes
        for metric in metrics
    ]
    others = [
        {"model": row, "metric": metric, **dict(zip(revisions, values(row, metric), strict=True))}
        for row in rows
        if _latent(row)[0] not in FAMILIES
        for metric in metrics
        if not all(pd.isna(t.at[row, f"{metric}_mean"]) for t in tables if row in t.index)  # e.g. no digit head
    ]
    return pd.DataFrame(study), pd.DataFrame(others)


def render(revisions: list[str], frames: tuple[pd.DataFrame, pd.DataFrame], markdown: bool) -> str:
    """The comparison as terminal tables (a repeated first cell left blank; about 120 columns for three revisions)
    or as markdown."""
    legend = f"{BETTER} better, {WORSE} worse than {revisions[0]} (relative change)"
    title = f"Table 1's means, {' against '.join(revisions)}"
    parts = []
    for frame, heading in zip(frames, ("CAE against CVAE, by latent size", "the other models"), strict=True):
        if frame.empty:
            continue
        if markdown:
            parts.append(f"**{heading}**\n\n{frame.to_markdown(index=False, disable_numparse=True)}")
        else:
            parts.append(f"{heading}:\n{_text_table(frame)}")
    if markdown:
        return f"### {title}\n\n" + "\n\n".join(parts) + f"\n\n{legend}\n"
    return f"{title}\n\n" + "\n\n".join(parts) + f"\n{legend}\n"


def _text_table(frame: pd.DataFrame) -> str:
    """Fixed-width columns: the two label columns left-aligned (a repeat of the first left blank), values right."""
    rows = [[str(v) for v in row] for row in frame.itertuples(index=False)]
    first = [str(v) for v in frame.iloc[:, 0]]
    for i in range(len(rows) - 1, 0, -1):
        if first[i] == first[i - 1]:
            rows[i][0] = ""
    header = [str(c) for c in frame.columns]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(cells).rstrip() for cells in [header, *rows])


def run_compare(revisions: list[str], pipeline: Path, markdown: bool) -> str:
    """Table 1 at each revision (none given: HEAD) and in the workspace, as a terminal or markdown table."""
    columns = [*(revisions or ["HEAD"]), WORKSPACE]
    tables = [read_table(revision, pipeline) for revision in columns]
    return render(columns, comparison(columns, tables), markdown)
