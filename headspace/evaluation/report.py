"""Summaries of evaluation records: a mean score per task and mode, as a markdown table, and a heatmap.

Means are taken per group: the needle tasks on the noise haystack and on the varied one,
every main task, and the held-out family apart (it is never part of the main means);
digit rows average the share of each numeric answer's digits kept. The two settings of
the harness are kept apart: rows of questions asked after compression carry ``[after]``,
and so do their group means; a heatmap draws one setting.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from headspace.errors import HeadspaceError
from headspace.evaluation.tasks import HELDOUT_TASKS, NEEDLE_TASKS

# mean rows: label, which records, which field
GROUPS = (
    ("needle tasks (mean)", lambda r: r["task"] in NEEDLE_TASKS and _haystack(r) == "noise", "score"),
    ("needle tasks, varied haystack (mean)", lambda r: r["task"] in NEEDLE_TASKS and _haystack(r) == "varied",
     "score"),
    ("all tasks (mean)", lambda r: r["task"] not in HELDOUT_TASKS, "score"),
    ("needle digits kept (mean)", lambda r: r["task"] in NEEDLE_TASKS, "digits"),
    ("held-out family (mean)", lambda r: r["task"] in HELDOUT_TASKS, "score"),
    ("held-out digits kept (mean)", lambda r: r["task"] in HELDOUT_TASKS, "digits"),
)


def _haystack(record: dict) -> str:
    return record.get("haystack", "noise")


def _setting(record: dict) -> str:
    return record.get("setting", "inside")


def _tag(record: dict) -> str:
    return " [after]" if _setting(record) == "after" else ""


def row_label(record: dict) -> str:
    """``task @length``, with ``[varied]`` for the varied haystack and ``[after]`` for questions after compression."""
    suffix = " [varied]" if _haystack(record) == "varied" else ""
    return f"{record['task']}{suffix} @{record['length']}{_tag(record)}"


def summarize(records: list[dict], modes: Sequence[str] | None = None, notes: Sequence[str] = ()) -> dict:
    """Mean score (0-100) per (task, haystack, length, setting) row and mode column, plus the group means of
    each setting; ``notes`` are printed under the table."""
    modes = list(modes) if modes is not None else list(dict.fromkeys(r["mode"] for r in records))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    groups: list[str] = []
    for r in records:
        cells[(row_label(r), r["mode"])].append(r["score"])
        for label, member, value in GROUPS:
            if member(r) and r.get(value) is not None:
                cells[(label + _tag(r), r["mode"])].append(r[value])
    rows = list(dict.fromkeys(row_label(r) for r in records))
    for setting in dict.fromkeys(_setting(r) for r in records):
        tag = _tag({"setting": setting})
        groups += [label + tag for label, _, _ in GROUPS if any(k[0] == label + tag for k in cells)]
    rows += groups
    table = {row: {m: round(100 * sum(cells[(row, m)]) / len(cells[(row, m)]), 1) if cells.get((row, m)) else None
                   for m in modes} for row in rows}
    counts = {row: max((len(cells.get((row, m), [])) for m in modes), default=0) for row in rows}
    return {"modes": modes, "rows": table, "samples": counts, "notes": list(notes)}


def table(summary: dict) -> str:
    """A markdown table of :func:`summarize`'s output, its notes below it."""
    modes = summary["modes"]
    lines = ["| task @ tokens | n | " + " | ".join(modes) + " |", "|---|---:|" + "---:|" * len(modes)]
    for row, cells in summary["rows"].items():
        values = " | ".join("-" if cells[m] is None else f"{cells[m]:.1f}" for m in modes)
        lines.append(f"| {row} | {summary['samples'][row]} | {values} |")
    if summary.get("notes"):
        lines += [""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines)


def heatmap(records: list[dict], path: str | Path, modes: Sequence[str] | None = None, haystack: str = "noise",
            setting: str = "inside") -> Path:
    """Single-needle score on ``haystack`` in ``setting`` by depth (rows) and length (columns), one panel per mode,
    as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = [r for r in records if r["task"] == "niah_single" and _haystack(r) == haystack
              and _setting(r) == setting]
    if not needle:
        raise HeadspaceError(f"no niah_single records on the {haystack} haystack ({setting}) to draw a heatmap from")
    modes = list(modes) if modes is not None else list(dict.fromkeys(r["mode"] for r in needle))
    depths = sorted({r["depth"] for r in needle})
    lengths = sorted({r["length"] for r in needle})
    cols = min(len(modes), 4)
    rows = (len(modes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 1.1 * len(lengths) * cols, 0.8 + 0.45 * len(depths) * rows),
                             squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        grid = [[None] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                hits = [r["score"] for r in needle if r["mode"] == mode and r["depth"] == depth
                        and r["length"] == length]
                grid[i][j] = sum(hits) / len(hits) if hits else float("nan")
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_title(mode + (" [after]" if setting == "after" else ""), fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    fig.supxlabel("prompt tokens", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
