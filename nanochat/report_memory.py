"""The report's Memory section: what MegaContext's memory buys a chat, in two measures.

* LongDoc: a question about a long document. `chat_eval` of an MC checkpoint answers it through the
  model's memory and logs "Chat evaluation <stage> MC session (<tag>)" with `- LongDoc: <accuracy>`;
  `chat_eval --memory plain` of the same model (the prompt cut to the model's sequence_len) gives the figure
  beside it.
* The passkey curve: accuracy against the distance from the key to the question, in multiples of the
  working-context budget, for the model's own memory view (mc-lens) and the recent window of the same
  budget (and full attention where it ran). Read from the accuracy table mc_eval logs into its
  "Long-context eval <source> (<tag>)" section (`| task | view | 1x | 2x | ... |`, cells `acc% [ci95]`),
  averaged over the passkey tasks; shown as a table and as a PNG plot per model.

The plot is drawn with numpy (grid, lines, markers, tick labels in a 3x5 pixel font) and written with
scripts.focus_plot.png_bytes, so the report needs no plotting library.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from nanochat.common import atomic_write_bytes
from nanochat.report_tables import SESSION, _fields, _number, _tag, markdown_table, split_title

CURVE_VIEWS = {"mc-lens": (0, 114, 178), "window": (230, 159, 0), "full": (0, 0, 0)}  # Okabe-Ito colours
GLYPHS = {  # 3x5 pixel digits, "x" and "%" for the tick labels
    "0": ["111", "101", "101", "101", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"],
    "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"],
    "7": ["111", "001", "010", "010", "010"],
    "8": ["111", "101", "111", "101", "111"],
    "9": ["111", "101", "111", "001", "111"],
    "x": ["000", "101", "010", "101", "000"],
    "%": ["101", "001", "010", "100", "101"],
}


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row (escaped pipes stay inside their cell)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def passkey_curve(text: str) -> tuple[list[int], dict[str, dict[int, float]]]:
    """(distances, {view: {distance: mean accuracy over the passkey tasks}}) from the first
    `| task | view | 1x | ...` table in a section (mc_eval's accuracy table); empty when there is none."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _cells(line)[:2] == ["task", "view"]), None)
    if start is None:
        return [], {}
    distances = [int(c.removesuffix("x")) for c in _cells(lines[start])[2:] if re.fullmatch(r"\d+x", c)]
    sums: dict[str, dict[int, list[float]]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, view, *cells = _cells(line)
        if name.split(":")[0] != "passkey":
            continue
        for d, cell in zip(distances, cells):
            m = re.match(r"(\d+(?:\.\d+)?)", cell)  # "25 [10-50]" -> 25 %; "–" = not run
            if m:
                sums.setdefault(view, {}).setdefault(d, []).append(float(m.group(1)) / 100)
    curves = {v: {d: sum(a) / len(a) for d, a in per.items()} for v, per in sums.items()}
    return distances, curves


def longdoc_rows(sections: list[tuple[str, str]]) -> list[list[str]]:
    """[tag, stage, LongDoc through the memory, LongDoc in plain context] per model and stage that ran it."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for title, text in sections:
        name, tag = split_title(title)
        fields = _fields(text)
        session = name.endswith(SESSION)
        name = name.removesuffix(SESSION)
        if not name.startswith("Chat evaluation ") or "LongDoc" not in fields:
            continue
        value = _number(fields["LongDoc"])
        if value is not None:
            key = (_tag(tag, fields), name.removeprefix("Chat evaluation "))
            found.setdefault(key, {})["session" if session else "plain"] = value
    cell = lambda v: "-" if v is None else f"{v:.4f}"
    return [
        [tag, stage, cell(v.get("session")), cell(v.get("plain"))]
        for (tag, stage), v in sorted(found.items())
    ]


def _blit(image: np.ndarray, text: str, x: int, y: int, scale: int = 2, color=(80, 80, 80)) -> None:
    """Draw text with its top-left corner at (x, y)."""
    for i, ch in enumerate(text):
        for r, row in enumerate(GLYPHS[ch]):
            for c, bit in enumerate(row):
                if bit == "1":
                    x0, y0 = x + (4 * i + c) * scale, y + r * scale
                    image[y0 : y0 + scale, x0 : x0 + scale] = color


def _text_width(text: str, scale: int = 2) -> int:
    return (4 * len(text) - 1) * scale


def plot_curves(
    distances: list[int], curves: dict[str, dict[int, float]], width=480, height=300
) -> np.ndarray:
    """RGB uint8 [height, width, 3]: accuracy (0-100 %, up) against distance (log2, right), one coloured line
    with square markers per view, a grid at every 25 % and every distance, tick labels on both axes."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 44, width - 16, 12, height - 28
    logs = [math.log2(d) for d in distances]
    lo, hi = min(logs), max(logs)
    first, last = left + 20, right - 20  # x of the first and the last distance, inside the axes
    to_x = lambda d: int(
        round(first + (last - first) * ((math.log2(d) - lo) / (hi - lo) if hi > lo else 0.5))
    )
    to_y = lambda acc: int(round(bottom - (bottom - top) * acc))
    grid, axis = (225, 225, 225), (120, 120, 120)
    for pct in (0, 25, 50, 75, 100):
        y = to_y(pct / 100)
        image[y, left : right + 1] = grid if pct else axis
        label = f"{pct}%"
        _blit(image, label, left - 6 - _text_width(label), y - 5)
    for d in distances:
        x = to_x(d)
        image[top : bottom + 1, x] = grid
        _blit(image, f"{d}x", x - _text_width(f"{d}x") // 2, bottom + 8)
    image[top : bottom + 1, left] = axis
    for view, color in CURVE_VIEWS.items():
        points = [(to_x(d), to_y(curves[view][d])) for d in distances if d in curves.get(view, {})]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for t in np.linspace(0.0, 1.0, 2 * n + 1):
                x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                image[y - 1 : y + 2, x - 1 : x + 2] = color
        for x, y in points:
            image[y - 3 : y + 4, x - 3 : x + 4] = color
    return image


def memory_markdown(sections: list[tuple[str, str]], report_dir: Path) -> str:
    """The Memory section of report.md; writes the passkey plots (PNG) into report_dir."""
    from scripts.focus_plot import png_bytes

    parts = ["## Memory", ""]
    longdoc = longdoc_rows(sections)
    if longdoc:
        parts += [
            "LongDoc (a question about a long document), answered through the MegaContext memory "
            "(chat_eval) and in plain context cut to the model's sequence_len (chat_eval --memory plain):",
            "",
            markdown_table(["model", "stage", "LongDoc, MC session", "LongDoc, plain context"], longdoc),
            "",
        ]
    runs, plots = [], []  # (tag, curves) per model that logged passkey rows in a view we show
    for title, text in sections:
        name, tag = split_title(title)
        if not name.startswith("Long-context eval"):
            continue
        distances, curves = passkey_curve(text)
        if not any(v in curves for v in CURVE_VIEWS):
            continue
        tag = _tag(tag, _fields(text))
        runs.append((tag, curves))
        path = report_dir / f"memory_passkey_{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}.png"
        atomic_write_bytes(path, png_bytes(plot_curves(distances, curves)))
        plots.append(f"![passkey accuracy vs distance, {tag}]({report_dir.name}/{path.name})")
    if runs:
        distances = sorted({d for _, curves in runs for per in curves.values() for d in per})
        rows = [
            [tag, v, *(f"{100 * curves[v][d]:.0f}" if d in curves[v] else "–" for d in distances)]
            for tag, curves in runs
            for v in CURVE_VIEWS
            if v in curves
        ]
        parts += [
            "Passkey recall against distance (% correct over the passkey tasks; distance from the key to the "
            "question in multiples of the working-context budget; mc-lens = the model's MegaContext memory, "
            "window = the most recent tokens within the same budget, full = full attention), from mc_eval:",
            "",
            markdown_table(["model", "view", *(f"{d}x" for d in distances)], rows),
            "",
            *plots,
            "",
            "Plots: blue = mc-lens, orange = window, black = full; x: distance (log scale), y: accuracy.",
            "",
        ]
    if len(parts) == 2:
        parts += ["(no memory results logged yet: run chat_eval on an MC checkpoint and mc_eval)", ""]
    return "\n".join(parts)
