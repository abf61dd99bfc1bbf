"""The run report: sections per stage, summary table, generate/reset from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    """Where every exact match is 0, the answer-NLL table still separates views (issue 8)."""
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
