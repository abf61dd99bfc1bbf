"""bench_decode runs end to end at toy scale and prints its one JSON line (it once broke silently when a
config field it printed was removed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_decode_prints_one_line_with_a_row_per_history(tmp_path):
    args = "--histories 300,600 --decode-tokens 8 --warmup 2 --depth 2 --vocab-size 512 --seq-len 256"
    args += f" --wc-budget 64 --threads 1 --quiet --workdir {tmp_path}"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.bench_decode", *args.split()],
        cwd=REPO, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    r = json.loads(line)
    # a fresh model takes the recipe whose budget is --wc-budget (config.scale): K 16 at budget 64
    assert r["config"]["wc_budget"] == 64 and r["config"]["block_size"] == 16
    assert [row["history"] for row in r["results"]] == [300, 600]
    for row in r["results"]:
        assert row["mc_ms_median"] > 0 and row["wc_cost"] <= 64 and row["full_ms_median"] > 0
