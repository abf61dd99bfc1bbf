"""The run report: every stage appends a markdown section, `generate` stitches them into report.md.

    python -m nanochat.report reset      # start a new report (writes the system-info header)
    python -m nanochat.report generate   # write report.md (base dir + a copy in the cwd)

Sections live as one file each under $NANOCHAT_BASE_DIR/report/, so stages that run in different
processes (or are re-run) never clobber each other; re-running a stage replaces its section.
Numbers a stage logs under a name in SUMMARY_METRICS also appear in the summary table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from nanochat.common import atomic_write_text, get_base_dir, get_dist_info, run_main
from nanochat.report_memory import memory_markdown
from nanochat.report_tables import markdown_table, results_markdown

# Stage order in report.md; sections not listed here follow, oldest first.
STAGES = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
    "Long-context eval base",
]
# Metric names collected into the summary table (one column per section that logged any of them).
SUMMARY_METRICS = [
    "train_bpb",
    "val_bpb",
    "CORE",
    "ARC-Easy",
    "ARC-Challenge",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "SpellingBee",
    "LongDoc",
    "ChatCORE",
    "passkey",
    "mqar",
]
HEADER_FILE = "header.md"
TIMESTAMP_FMT = "%Y-%m-%d %H:%M:%S"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:  # Linux: platform.processor() is usually empty, /proc/cpuinfo has the marketing name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict:
    """Where and on what the run happened: git state, hardware, software."""
    info = {
        "git commit": _git("rev-parse", "--short", "HEAD"),
        "git branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "git dirty": _git("status", "--porcelain") not in ("", "unknown"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["gpu"] = f"{len(names)}x {names[0]} ({mem:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none"
    return info


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.4e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _parse_value(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


class Report:
    """Sections as markdown files in one directory; only rank 0 writes (see get_report)."""

    def __init__(self, report_dir: str | Path):
        self.report_dir = Path(report_dir)

    def log(self, section: str, data: list[dict | str]) -> Path:
        """Write (or replace) the section: dicts become `- key: value` lines, strings are copied verbatim."""
        self.report_dir.mkdir(parents=True, exist_ok=True)
        if not (self.report_dir / HEADER_FILE).exists():
            self.write_header()
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime(TIMESTAMP_FMT)}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
            else:
                lines.append(str(item).rstrip("\n"))
            lines.append("")
        path = self.report_dir / f"{slugify(section)}.md"
        atomic_write_text(path, "\n".join(lines))
        return path

    def write_header(self) -> None:
        lines = ["# nanochat + MegaContext run report", ""]
        lines.append(f"report started: {datetime.datetime.now().strftime(TIMESTAMP_FMT)}")
        lines.append(f"start_time: {time.time():.0f}")
        lines += ["", "## Environment", ""]
        lines += [f"- {k}: {_format_value(v)}" for k, v in system_info().items()]
        atomic_write_text(self.report_dir / HEADER_FILE, "\n".join(lines) + "\n")

    def reset(self) -> None:
        """Drop every section and start a new header."""
        if self.report_dir.exists():
            for path in self.report_dir.glob("*.md"):
                path.unlink()
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.write_header()

    def sections(self) -> list[tuple[str, str]]:
        """(title, markdown) of every section, in stage order."""
        found = []
        for path in self.report_dir.glob("*.md"):
            if path.name == HEADER_FILE:
                continue
            text = path.read_text(encoding="utf-8")
            title = text.splitlines()[0].removeprefix("## ").strip() if text else path.stem
            found.append((title, text, path.stat().st_mtime))
        order = {name: i for i, name in enumerate(STAGES)}
        # titles may carry a model tag, "Base model training (d4-mc)": order by the stage name before it
        stage = lambda title: re.sub(r" \([^()]*\)$", "", title).removesuffix(" MC session")
        found.sort(key=lambda s: (order.get(stage(s[0]), len(STAGES)), s[2]))
        return [(title, text) for title, text, _ in found]

    def summary_table(self, sections: list[tuple[str, str]]) -> str:
        """Markdown table of SUMMARY_METRICS (rows) per section that logged them (columns)."""
        columns: list[tuple[str, dict]] = []
        for title, text in sections:
            metrics = {}
            for line in text.splitlines():
                m = re.match(r"^- ([^:]+): (.+)$", line)
                if m and m.group(1) in SUMMARY_METRICS and _parse_value(m.group(2)) is not None:
                    metrics[m.group(1)] = _parse_value(m.group(2))
            if metrics:
                columns.append((title, metrics))
        if not columns:
            return "(no summary metrics logged yet)"
        names = [name for name in SUMMARY_METRICS if any(name in c[1] for c in columns)]
        rows = [[name, *(f"{c[1][name]:.4f}" if name in c[1] else "-" for c in columns)] for name in names]
        return markdown_table(["metric", *(title for title, _ in columns)], rows)

    def generate(self, copy_to: str | Path | None = None) -> Path:
        """Write report.md into the base dir (and a copy at `copy_to`); returns the base-dir path."""
        self.report_dir.mkdir(parents=True, exist_ok=True)
        if not (self.report_dir / HEADER_FILE).exists():
            self.write_header()
        header = (self.report_dir / HEADER_FILE).read_text(encoding="utf-8")
        sections = self.sections()
        start = re.search(r"^start_time: (\d+)", header, re.M)
        wall = ""
        if start:
            elapsed = max(0.0, time.time() - int(start.group(1)))  # start_time is whole seconds
            wall = f"\n- total wall clock time since reset: {elapsed / 3600:.2f} h ({elapsed:.0f} s)\n"
        body = [header.rstrip("\n"), "", "## Summary", "", self.summary_table(sections), wall]
        body += [results_markdown(sections), memory_markdown(sections, self.report_dir)]
        body += [text.rstrip("\n") + "\n" for _, text in sections]
        report = "\n".join(body)
        out = self.report_dir.parent / "report.md"
        atomic_write_text(out, report)
        if copy_to is not None:
            atomic_write_text(copy_to, report)
        return out


class DummyReport:
    """What non-zero ranks get: logging is a no-op so every rank can call it."""

    def log(self, section: str, data: list[dict | str]) -> None:
        return None

    def reset(self) -> None:
        return None

    def generate(self, copy_to=None) -> None:
        return None


def get_report() -> Report | DummyReport:
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(get_base_dir() / "report")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build or reset the run report (report.md).")
    parser.add_argument("command", choices=["generate", "reset"], help="generate report.md, or start afresh")
    args = parser.parse_args()
    report = Report(get_base_dir() / "report")
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.report_dir}")
        return
    out = report.generate(copy_to=Path.cwd() / "report.md")
    print(f"wrote {out} and {Path.cwd() / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
