"""The report's results tables: one row per model and stage (BASE/MID/SFT/RL), one column per benchmark,
and MegaContext against vanilla when runs of both are in the report.

Reads the report's markdown sections (nanochat.report.Report.sections()): a section title names its stage
and, in parentheses, its model tag ("Chat evaluation sft (d20-mc)"); its `- key: value` lines hold the
numbers. A section without a tag in its title gets it from its `- checkpoint: <dir>/<tag> step N` line, or
from `- model_tag:` / `- depth:` (base_train's flags). A model counts as MegaContext when any of its
sections says `- mc: True` (a training stage's flags) or `- megacontext: on|session`.
"""

from __future__ import annotations

import re

# Benchmark columns in display order: CORE (base), the chat tasks, ChatCORE, then long-context ones.
COLUMNS = [
    "CORE",
    "ARC-Easy",
    "ARC-Challenge",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "SpellingBee",
    "ChatCORE",
    "LongDoc",
    "passkey",
    "mqar",
    "vartrack",
    "Arithmetic",
    "Identity",
]
ROW_ORDER = ["BASE", "MID", "SFT", "RL"]
# Section title (without its tag) -> stage row. Prefix match, first hit wins.
STAGE_OF = [
    ("Base model", "BASE"),
    ("Long-context", "BASE"),
    ("MC evaluation", "BASE"),
    ("Midtraining", "MID"),
    ("Chat evaluation mid", "MID"),
    ("Chat SFT", "SFT"),
    ("Chat evaluation sft", "SFT"),
    ("Chat RL", "RL"),
    ("Chat evaluation rl", "RL"),
]
SESSION = " MC session"  # chat_eval through the memory: "Chat evaluation sft MC session (d20-mc)"
SESSION_ROW = " (MC session)"  # its row in the stage table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table: header, delimiter and rows with the same number of cells. A pipe
    inside a cell (a model tag, a section title) is escaped and a newline flattened, so no cell can split
    into two or swallow the next row."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"a row's cell count differs from the header's {len(header)}")
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    line = lambda cells: "| " + " | ".join(cell(c) for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def _fields(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^- ([^:\n]+): (.*)$", text, re.M)}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def split_title(title: str) -> tuple[str, str | None]:
    """("Chat evaluation sft", "d20") from "Chat evaluation sft (d20)"; no parentheses -> (title, None)."""
    m = re.fullmatch(r"(.+?) \(([^()]+)\)", title.strip())
    return (m.group(1), m.group(2)) if m else (title.strip(), None)


def _tag(tag: str | None, fields: dict[str, str]) -> str:
    if tag:
        return tag
    m = re.match(r"(.+?) step \d+$", fields.get("checkpoint", ""))
    if m:
        return m.group(1).rstrip("/").rsplit("/", 1)[-1]
    if fields.get("model_tag"):
        return fields["model_tag"]
    return f"d{fields['depth']}" if fields.get("depth") else "-"


def collect(sections: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], dict[str, float]], set[str]]:
    """({(tag, row): {column: value}}, the tags that are MegaContext models).

    row: BASE, MID, SFT, RL, or e.g. "SFT (MC session)" for chat_eval results through the memory."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    mc_tags: set[str] = set()
    for title, text in sections:
        name, tag = split_title(title)
        fields = _fields(text)
        tag = _tag(tag, fields)
        if fields.get("mc") == "True" or fields.get("megacontext") in ("on", "session"):
            mc_tags.add(tag)
        session = name.endswith(SESSION)
        name = name.removesuffix(SESSION)
        row = next((r for prefix, r in STAGE_OF if name.startswith(prefix)), None)
        if row is None:
            continue
        values = {c: v for c in COLUMNS if c in fields and (v := _number(fields[c])) is not None}
        if values:
            table.setdefault((tag, row + (SESSION_ROW if session else "")), {}).update(values)
    return table, mc_tags


def _row_key(key: tuple[str, str]) -> tuple[str, int, str]:
    tag, row = key
    base = row.split(" ")[0]
    return tag, ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), row


def stage_table(sections: list[tuple[str, str]]) -> str:
    """Markdown: model | MC | stage | one column per benchmark that any row has."""
    table, mc_tags = collect(sections)
    if not table:
        return "(no benchmark results logged yet)"
    columns = [c for c in COLUMNS if any(c in v for v in table.values())]
    rows = []
    for key in sorted(table, key=_row_key):
        cells = [f"{table[key][c]:.4f}" if c in table[key] else "-" for c in columns]
        rows.append([key[0], "yes" if key[0] in mc_tags else "no", key[1], *cells])
    return markdown_table(["model", "MC", "stage", *columns], rows)


def partner(mc_tag: str, vanilla: list[str]) -> str | None:
    """The vanilla model an MC model is compared with: same tag without "-mc", else the only vanilla one."""
    stripped = re.sub(r"[-_]?mc$", "", mc_tag)
    if stripped in vanilla:
        return stripped
    return vanilla[0] if len(vanilla) == 1 else None


def mc_vs_vanilla(sections: list[tuple[str, str]]) -> str:
    """Markdown: per stage and benchmark, MC value vs vanilla value (difference); "" when not both ran."""
    table, mc_tags = collect(sections)
    tags = {tag for tag, _ in table}
    vanilla = sorted(tags - mc_tags)
    lines = []
    for mc_tag in sorted(tags & mc_tags):
        other = partner(mc_tag, vanilla)
        if other is None:
            continue
        # the MC model per stage: its plain results, overridden by those through its memory (the chat path)
        mine: dict[str, dict[str, float]] = {}
        for (t, r), values in sorted(table.items(), key=lambda kv: kv[0][1].endswith(SESSION_ROW)):
            if t == mc_tag:
                mine.setdefault(r.removesuffix(SESSION_ROW), {}).update(values)
        rows = sorted(mine.keys() & {r for t, r in table if t == other}, key=lambda r: _row_key(("", r)))
        for row in rows:
            a, b = mine[row], table[(other, row)]
            for c in [c for c in COLUMNS if c in a and c in b]:
                lines.append(
                    [f"{mc_tag} vs {other}", row, c, f"{a[c]:.4f}", f"{b[c]:.4f}", f"{a[c] - b[c]:+.4f}"]
                )
    if not lines:
        return ""
    return markdown_table(["models", "stage", "metric", "MC", "vanilla", "MC - vanilla"], lines)


def results_markdown(sections: list[tuple[str, str]]) -> str:
    """The results block report.md shows under its summary."""
    parts = ["## Results by stage", "", stage_table(sections), ""]
    versus = mc_vs_vanilla(sections)
    if versus:
        parts += ["## MegaContext vs vanilla", "", versus, ""]
    return "\n".join(parts)
