"""The run report: sections per stage, summary table, generate/reset from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat.report import DummyReport, Report, get_report
from nanochat.report import main as report_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "base"


def test_sections_summary_and_order(base):
    report = get_report()
    assert isinstance(report, Report)
    # logged out of stage order; report.md lists them in pipeline order
    report.log("Base model evaluation", [{"CORE": 0.1234}])
    report.log(
        "Base model training",
        [{"depth": 4, "lr": 0.02}, {"val_bpb": 1.5, "parameters": 1234567}, "free text"],
    )
    report.log("Custom stage", [{"note": "hello"}])
    report.log("Base model training", [{"depth": 4}, {"val_bpb": 1.25}])  # a re-run replaces its section
    out = report.generate(copy_to=Path.cwd() / "report.md")
    text = out.read_text()
    assert out == base / "report.md" and (Path.cwd() / "report.md").read_text() == text
    assert "## Environment" in text and "- torch: " in text and "- git commit: " in text
    assert (
        text.index("## Base model training")
        < text.index("## Base model evaluation")
        < text.index("## Custom stage")
    )
    assert text.count("## Base model training") == 1 and "- val_bpb: 1.25" in text and "free text" not in text
    summary = text[text.index("## Summary") : text.index("## Base model training")]
    assert "| metric | Base model training | Base model evaluation |" in summary
    assert "| val_bpb | 1.2500 | - |" in summary and "| CORE | - | 0.1234 |" in summary
    assert "total wall clock time" in summary
    assert not [p for p in (base / "report").iterdir() if p.name.endswith(".tmp")]


def test_report_shows_results_by_stage_with_long_context_columns(base):
    """generate() puts the per-stage results table (and MC vs vanilla) under the summary; mc_eval's headline
    fields land in its long-context columns."""
    from scripts.mc_eval import headline

    report = get_report()
    report.log("Base model training (d4-mc)", [{"mc": True, "val_bpb": 2.0}])
    report.log("Base model training (d4)", [{"val_bpb": 1.9}])
    rows = [
        ("passkey:k=1", 4, "mc-lens", {"accuracy": 0.5}),
        ("passkey:k=2", 4, "mc-lens", {"accuracy": 1.0}),
    ]
    rows += [("passkey:k=1", 1, "mc-lens", {"accuracy": 0.0}), ("mqar:n=8", 4, "full", {"accuracy": 1.0})]
    fields = headline(rows, [1, 4, 8])
    assert fields["passkey"] == 0.75 and "mqar" not in fields  # mqar has no mc-lens result
    report.log("Long-context eval base (d4-mc)", [{"checkpoint": "base/d4-mc@5", **fields}, "| table |"])
    report.log("Long-context eval base (d4)", [{"checkpoint": "base/d4@5", "passkey": 0.0}, "| table |"])
    text = report.generate().read_text()
    results = text[text.index("## Results by stage") : text.index("## Base model training")]
    assert "| d4-mc | yes | BASE | 0.7500 |" in results and "| d4 | no | BASE | 0.0000 |" in results
    assert "| d4-mc vs d4 | BASE | passkey | 0.7500 | 0.0000 | +0.7500 |" in results


def test_mc_eval_tables_give_accuracy_and_answer_nll():
    """Where every exact match is 0, the answer-NLL table still separates views."""
    from scripts.mc_eval import markdown_table

    cell = {"accuracy": 0.25, "ci95_low": 0.1, "ci95_high": 0.5, "nll": 2.3456}
    rows = [("passkey:k=1", 4, "full", cell), ("passkey:k=1", 8, "full", {"accuracy": None})]
    assert "| passkey:k=1 | full | 25 [10-50] | – |" in markdown_table(rows, [4, 8], ["full"])
    assert "| passkey:k=1 | full | 2.346 | – |" in markdown_table(rows, [4, 8], ["full"], metric="nll")


def test_dict_values_are_formatted(base):
    path = get_report().log("Tokenizer training", [{"vocab": 65536, "ratio": 4.123456789, "ok": True}])
    text = path.read_text()
    assert "- vocab: 65,536" in text and "- ratio: 4.12346" in text and "- ok: True" in text


def test_cli_generate_and_reset(base, monkeypatch):
    get_report().log("Base model loss", [{"train_bpb": 1.1, "val_bpb": 1.2}])
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    out = subprocess.run(
        [sys.executable, "-m", "nanochat.report", "generate"],
        cwd=Path.cwd(),
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "| train_bpb | 1.1000 |" in (base / "report.md").read_text()
    assert (Path.cwd() / "report.md").is_file()
    # the same entry point in-process (saves starting Python again)
    monkeypatch.setattr(sys, "argv", ["report", "reset"])
    report_main()
    assert [p.name for p in (base / "report").iterdir()] == ["header.md"]
    monkeypatch.setattr(sys, "argv", ["report", "generate"])
    report_main()
    assert "(no summary metrics logged yet)" in (base / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["report", "frobnicate"])
    with pytest.raises(SystemExit) as exc:
        report_main()
    assert exc.value.code == 2


def test_nonzero_rank_does_not_write(base, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log("Base model training", [{"val_bpb": 1.0}])
    assert not (base / "report").exists()


def gfm_cells(line: str) -> list[str]:
    """The cells of a GitHub-flavoured Markdown table row: outer pipes dropped, split on unescaped pipes."""
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def gfm_tables(text: str) -> dict[str, list[list[str]]]:
    """Every table in a Markdown text, keyed by the `## ` heading above it: [header, delimiter, *rows]. Rows
    run to the first line that does not start with a pipe."""
    tables, heading, lines, i = {}, "", text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("## "):
            heading = lines[i][3:]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", nxt.strip()):
            block = [lines[i], nxt]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            tables.setdefault(heading, []).append([gfm_cells(line) for line in block])
            continue
        i += 1
    return tables


def log_runcpu_like_report(report) -> None:
    """The sections a runcpu run leaves (two models, every stage), mc_eval's tables made by mc_eval itself,
    and a model tag with a pipe in it (a legal directory name that splits a naive table cell)."""
    from scripts.mc_eval import headline, markdown_table

    report.log("Tokenizer evaluation", [{"vocab_size": 4096}, "```\nsplit  docs\n```"])
    for tag, mc in (("d4", False), ("d4-mc", True), ("d4|x", False)):
        report.log(f"Base model training ({tag})", [{"depth": 4, "mc": mc}, {"val_bpb": 2.25}])
        report.log(
            f"Base model loss ({tag})", [{"train_bpb": 2.2, "val_bpb": 2.3}, "| view | bpb |\n|---|---|"]
        )
        views = ["full", "window", "mc-lens"] if mc else ["full", "window"]
        acc = {"full": [1.0, 1.0, 1.0], "window": [1.0, 0.0, 0.0], "mc-lens": [1.0, 0.75, 0.5]}
        rows = [
            (task, dx, v, {"accuracy": a, "ci95_low": 0.0, "ci95_high": 1.0})
            for task in ("passkey:k=1", "passkey:k=2", "mqar:n=8")
            for v in views
            for dx, a in zip([1, 4, 16], acc[v])
        ]
        report.log(
            f"Long-context eval base ({tag})",
            [
                {"checkpoint": f"base/{tag}@5", **headline(rows, [1, 4, 16])},
                markdown_table(rows, [1, 4, 16], views),
            ],
        )
        report.log(f"Chat SFT ({tag})", [{"val_bpb": 1.5}])
        report.log(f"Chat evaluation sft ({tag})", [{"LongDoc": 0.1, "SpellingBee": 0.2}, {"ChatCORE": 0.15}])
    report.log("Chat evaluation sft MC session (d4-mc)", [{"megacontext": "session"}, {"LongDoc": 0.6}])


def test_every_report_table_parses_as_markdown_with_equal_cell_counts(base):
    report = get_report()
    log_runcpu_like_report(report)
    tables = gfm_tables(report.generate().read_text())
    summary = tables["Summary"][0]
    assert summary[0][:4] == [
        "metric",
        "Base model training (d4)",
        "Base model training (d4-mc)",
        "Base model training (d4\\|x)",
    ]
    for heading in ("Summary", "Results by stage", "MegaContext vs vanilla", "Memory"):
        for table in tables[heading]:
            assert len({len(row) for row in table}) == 1, (heading, [len(row) for row in table])
    assert len(summary[0]) == 1 + 3 * 5 + 1  # metric + five sections per model + the MC session
    assert {row[0] for row in summary[2:]} == {
        "train_bpb",
        "val_bpb",
        "ChatCORE",
        "passkey",
        "mqar",
        "SpellingBee",
        "LongDoc",
    }


def test_memory_section_shows_longdoc_and_the_passkey_curve_with_a_plot(base):
    report = get_report()
    log_runcpu_like_report(report)
    text = report.generate().read_text()
    memory = text[text.index("## Memory") : text.index("## Tokenizer evaluation")]
    longdoc, curve = gfm_tables(text)["Memory"]
    assert ["d4-mc", "sft", "0.6000", "0.1000"] in longdoc and ["d4", "sft", "-", "0.1000"] in longdoc
    assert curve[0] == ["model", "view", "1x", "4x", "16x"]
    # per view, the mean over the two passkey tasks (the mqar rows are not passkey)
    assert ["d4-mc", "mc-lens", "100", "75", "50"] in curve and ["d4-mc", "window", "100", "0", "0"] in curve
    assert ["d4", "full", "100", "100", "100"] in curve and not any(
        r[1] == "mc-lens" for r in curve if r[0] == "d4"
    )
    assert "![passkey accuracy vs distance, d4-mc](report/memory_passkey_d4-mc.png)" in memory
    png = (base / "report" / "memory_passkey_d4-mc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_passkey_plot_draws_each_view_where_its_accuracy_lies():
    from nanochat.report_memory import CURVE_VIEWS, plot_curves

    curves = {"mc-lens": {1: 1.0, 4: 1.0, 16: 1.0}, "window": {1: 1.0, 4: 0.0, 16: 0.0}}
    image = plot_curves([1, 4, 16], curves)
    assert image.shape == (300, 480, 3) and image.dtype == np.uint8
    blue, orange = (np.all(image == CURVE_VIEWS[v], axis=-1) for v in ("mc-lens", "window"))
    assert blue.sum() > 300 and orange.sum() > 300  # lines, not only markers
    rows, cols = np.nonzero(orange)
    assert rows[cols == cols.min()].mean() < rows[cols == cols.max()].mean() - 200  # 100 % at 1x, 0 % at 16x
    assert np.nonzero(blue)[0].max() < rows.max() - 200  # mc-lens stays at the top
    assert not np.all(image == CURVE_VIEWS["full"], axis=-1)[20:250, 60:460].any()  # no full-attention run


def test_mc_vs_vanilla_compares_the_mc_model_through_its_memory(base):
    """An MC chat model is used through its memory: where chat_eval ran it both ways, the comparison with the
    vanilla model takes the MC session's figure (LongDoc 0.6 here, not the plain run's 0.1)."""
    report = get_report()
    log_runcpu_like_report(report)
    versus = gfm_tables(report.generate().read_text())["MegaContext vs vanilla"][0]
    longdoc = [r for r in versus if r[1] == "SFT" and r[2] == "LongDoc"]
    assert longdoc == [["d4-mc vs d4", "SFT", "LongDoc", "0.6000", "0.1000", "+0.5000"]]
    assert ["d4-mc vs d4", "SFT", "SpellingBee", "0.2000", "0.2000", "+0.0000"] in versus  # plain run only
