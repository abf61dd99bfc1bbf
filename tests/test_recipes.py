"""The GPU recipes (speedrun.sh, run1000.sh): their --dry-run command lists, --help, resume, shellcheck.

A dry run prints one command per line (a stage already done is a `# skip` comment) and installs nothing,
so these tests run anywhere in well under a second per recipe.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"speedrun.sh": 20, "run1000.sh": 32}  # recipe -> depth
TRAINING = ["scripts.base_train", "scripts.mid_train", "scripts.chat_sft"]
ORDER = [
    "nanochat.report reset",
    "nanochat.dataset -n 8",
    "scripts.tok_train",
    "scripts.tok_eval",
    "scripts.base_train",
    "scripts.base_loss",
    "scripts.base_eval",
    "scripts.mid_train",
    "scripts.chat_eval -i mid",
    "scripts.chat_sft",
    "scripts.chat_eval -i sft",
    "nanochat.report generate",
]


def run(recipe: str, base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run(
        ["bash", str(REPO / recipe), *args], env=env, capture_output=True, text=True, timeout=60
    )


def commands(recipe: str, base: Path, *args: str) -> list[list[str]]:
    out = run(recipe, base, "--dry-run", *args)
    assert out.returncode == 0, out.stderr
    return [
        shlex.split(line) for line in out.stdout.splitlines() if line.strip() and not line.startswith("#")
    ]


def module(cmd: list[str]) -> str:
    return cmd[cmd.index("-m") + 1]


def torchrun_hands_over(cmd: list[str]) -> None:
    """Parse a torchrun command with torchrun's own parser and check the script gets every argument after the
    module: argparse would otherwise take a script flag for an abbreviation of a torchrun option (`--run` is
    ambiguous between --run-path and --run_path), and the real run would die before the script starts."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    try:
        ns = parser.parse_args(cmd[1:])
    except SystemExit:
        pytest.fail(f"torchrun rejects {shlex.join(cmd)}")
    assert ns.module and ns.training_script == module(cmd)
    assert ns.training_script_args == cmd[cmd.index("--") + 1 :]


def recipe_settings(cmd: list[str]) -> list[str]:
    """The MegaContext settings a command passes: --mc-*, --lensnet-* and --gistnet-* flags, and --mc (not
    --mc-eval-rows: how many validation rows the views score, an evaluation size runcpu --quick shrinks)."""
    flags = [a for a in cmd if a == "--mc" or a.startswith(("--mc-", "--lensnet-", "--gistnet-"))]
    return [a for a in flags if a != "--mc-eval-rows"]


def position(cmds: list[list[str]], step: str) -> int:
    return next(i for i, c in enumerate(cmds) if step in " ".join(x for x in c if x != "--"))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("mc", [False, True])
def test_dry_run_stage_order_mc_and_torchrun(recipe, mc, tmp_path):
    depth = RECIPES[recipe]
    cmds = commands(recipe, tmp_path, *(["--mc"] if mc else []))
    assert [position(cmds, s) for s in ORDER] == sorted(position(cmds, s) for s in ORDER)
    background = [c for c in cmds if c[-1] == "&"]
    assert len(background) == 1 and "nanochat.dataset" in background[0]  # the bulk download runs alongside
    assert (
        position(cmds, "nanochat.dataset -n 8")
        < cmds.index(background[0])
        < position(cmds, "scripts.tok_train")
    )
    tag = f"d{depth}-mc" if mc else f"d{depth}"
    heavy = [c for c in cmds if c[0] == "torchrun"]
    assert {module(c) for c in heavy} >= {
        *TRAINING,
        "scripts.base_loss",
        "scripts.base_eval",
        "scripts.chat_eval",
    }
    for c in heavy:
        assert c[1:4] == ["--standalone", "--nproc-per-node", "8"] and c[4] == "-m"
        torchrun_hands_over(c)
        assert c[c.index("--model-tag") + 1] == tag  # every stage works on the same model
        assert ("--mc" in c) == (mc and module(c) in TRAINING)  # --mc reaches every training stage, only them
        if module(c) in TRAINING:  # recipes pass scale; the MC recipe is base_train's default
            assert recipe_settings(c) == (["--mc"] if mc else [])
    base_train = next(c for c in heavy if module(c) == "scripts.base_train")
    assert base_train[base_train.index("--depth") + 1] == str(depth)
    session = [c for c in heavy if "--memory" in c]  # the MC model's LongDoc without its memory
    assert len(session) == (1 if mc else 0)


def test_nproc_rl_run_name_and_extra_flags(tmp_path):
    cmds = commands(
        "speedrun.sh",
        tmp_path,
        "--nproc",
        "4",
        "--rl",
        "--run",
        "exp1",
        "--mc",
        "--",
        "--mc-wc-budget",
        "256",
    )
    heavy = [c for c in cmds if c[0] == "torchrun"]
    assert all(c[3] == "4" for c in heavy)
    for c in heavy:
        if module(c) in TRAINING:
            assert c[c.index("--run") + 1] == "exp1" and c[-2:] == ["--mc-wc-budget", "256"]
        else:
            assert "--mc-wc-budget" not in c
    assert position(cmds, "scripts.chat_sft") < position(cmds, "scripts.chat_rl") < position(cmds, "-i rl")
    assert position(cmds, "-i rl") < position(cmds, "nanochat.report generate")


def test_rerun_skips_done_stages_and_resumes_interrupted_training(tmp_path):
    state = tmp_path / "recipe_state"
    state.mkdir()
    for stage in ("data-head", "data", "tok-train", "tok-eval", "base-train"):
        (state / f"d20-{stage}.done").touch()
    mid = tmp_path / "mid_checkpoints" / "d20"
    mid.mkdir(parents=True)
    for step in (500, 1000):
        (mid / f"meta_{step:06d}.json").write_text("{}")
    out = run("speedrun.sh", tmp_path, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    skipped = [x for x in lines if x.startswith("# skip")]
    assert len(skipped) == 4 and any("base-train" in x and "scripts.base_train" in x for x in skipped)
    assert not any(
        "nanochat.report reset" in x or "nanochat.dataset" in x for x in lines if not x.startswith("#")
    )
    cmds = commands("speedrun.sh", tmp_path)
    mid_cmd = next(c for c in cmds if "scripts.mid_train" in c)
    assert mid_cmd[-2:] == ["--resume-from-step", "1000"]
    base_loss = next(c for c in cmds if "scripts.base_loss" in c)  # the next stage after the done ones runs
    assert "--resume-from-step" not in base_loss


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_documents_every_flag_and_bad_flags_fail(recipe, tmp_path):
    text = (REPO / recipe).read_text()
    if "source ./node8.sh" in text:  # speedrun.sh and run1000.sh share their body
        text += (REPO / "node8.sh").read_text()
    flags = set(re.findall(r"^\s+(-[-\w]+(?: \| -[-\w]+)*)\)", text, re.M))
    flags = {f for group in flags for f in group.split(" | ")} - {"--"}
    assert {"--mc", "--rl", "--nproc", "--run", "--dry-run", "--help"} <= flags
    out = run(recipe, tmp_path, "--help")
    assert out.returncode == 0
    for flag in flags:
        assert re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", out.stdout, re.M), (
            f"--help does not document {flag}"
        )
    bad = run(recipe, tmp_path, "--bogus")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --bogus (see --help)"


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed; CI must install it (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run(
        ["shellcheck", "-x", *RECIPES, "node8.sh", "recipe_lib.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- runcpu.sh (CPU, vanilla d4 and MC d4-mc side by side) and run10.sh (one GPU)


@pytest.mark.parametrize("quick", [False, True])
def test_runcpu_dry_run_trains_both_models_through_every_stage(quick, tmp_path):
    cmds = commands("runcpu.sh", tmp_path, *(["--quick"] if quick else []))
    assert all(c[0] == "python" for c in cmds)  # one CPU process per stage: no torchrun
    order = [
        "nanochat.report reset",
        "nanochat.dataset --local --synthetic-longctx 0.2",
        "scripts.tok_train --vocab-size 4096",
        "scripts.tok_eval",
        "--model-tag d4 ",
        "--model-tag d4-mc ",
        "scripts.mc_eval",
        "scripts.mid_train",
        "scripts.chat_sft",
        "scripts.chat_eval -i sft",
        "scripts.chat_cli",
        "nanochat.report generate",
    ]
    joined = [" ".join(c) + " " for c in cmds]
    pos = [next(i for i, j in enumerate(joined) if s in j) for s in order]
    assert pos == sorted(pos)
    assert cmds[-2][cmds[-2].index("-p") + 1] == "Why is the sky blue?"  # quoted so it survives a copy-paste
    for tag in ("d4", "d4-mc"):
        mc = tag == "d4-mc"
        mods = [module(c) for c in cmds if "--model-tag" in c and c[c.index("--model-tag") + 1] == tag]
        for m in ("scripts.base_train", "scripts.base_loss", "scripts.mc_eval", "scripts.mid_train"):
            assert m in mods, f"{m} missing for {tag}"
        assert {"scripts.chat_sft", "scripts.chat_eval"} <= set(mods)
        for c in cmds:
            if "--model-tag" not in c or c[c.index("--model-tag") + 1] != tag:
                continue
            if module(c) in TRAINING:
                # no --dtype: the default probes the CPU (bf16 autocast only where it is measurably faster)
                assert ("--mc" in c) == mc and "--device-type" in c and "--dtype" not in c
            if module(c) in ("scripts.mid_train", "scripts.chat_sft", "scripts.chat_eval"):
                assert c[c.index("--dataset") + 1] == "offline"
            if module(c) == "scripts.mc_eval":
                assert ("--views" in c) == (not mc)  # a vanilla model has only the full and window views
                if not mc:  # ... and its window is the MC model's budget, so the two compare at equal memory
                    assert c[c.index("--wc-budget") + 1] == (
                        "64" if quick else "128"
                    )  # the sequence length / 4
                if quick:
                    assert c[c.index("--n") + 1] == "4" and c[c.index("--distances") + 1] == "1,4"
        base = next(
            c for c in cmds if module(c) == "scripts.base_train" and c[c.index("--model-tag") + 1] == tag
        )
        # the recipe is the defaults: the MC model gets --mc alone, its vanilla twin the same rows
        assert recipe_settings(base) == (["--mc"] if mc else [])
        assert mc or base[base.index("--longctx-frac") + 1] == "0.5"


@pytest.mark.parametrize("quick", [False, True])
def test_runcpu_mega_adds_the_zoom_model_scored_through_its_own_attention(quick, tmp_path):
    """--mega trains d4-mega under --attention mega (the zoom at its defaults: no other attention flag), scores
    its text and the long-context suite at its window of 32, before the MC model's suite (the report's headline)."""
    plain = commands("runcpu.sh", tmp_path, *(["--quick"] if quick else []))
    assert not any("d4-mega" in c for c in plain)
    cmds = commands("runcpu.sh", tmp_path, "--mega", *(["--quick"] if quick else []))
    mega = [c for c in cmds if "--model-tag" in c and c[c.index("--model-tag") + 1] == "d4-mega"]
    assert [module(c) for c in mega] == ["scripts.base_train", "scripts.base_loss", "scripts.mc_eval"]
    train, _, suite = mega
    assert [a for a in train if a.startswith(("--attention", "--mega-", "--mc"))] == ["--attention"]
    assert (
        train[train.index("--attention") + 1] == "mega" and train[train.index("--max-seq-len") + 1] == "256"
    )
    assert (
        suite[suite.index("--views") + 1] == "full,window" and suite[suite.index("--wc-budget") + 1] == "32"
    )
    mc_suite = next(c for c in cmds if module(c) == "scripts.mc_eval" and "d4-mc" in c)
    assert cmds.index(suite) < cmds.index(mc_suite)
    assert len(cmds) == len(plain) + 3


def test_runcpu_rerun_skips_done_stages_and_resumes(tmp_path):
    state = tmp_path / "recipe_state"
    state.mkdir()
    for name in ("report-reset", "data", "tok-train", "tok-eval", "d4-base-train"):
        (state / f"cpu-{name}.done").touch()
    ckpt = tmp_path / "base_checkpoints" / "d4-mc"
    ckpt.mkdir(parents=True)
    (ckpt / "meta_000300.json").write_text("{}")
    out = run("runcpu.sh", tmp_path, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert sum(x.startswith("# skip") for x in out.stdout.splitlines()) == 4  # report-reset: dir exists
    cmds = commands("runcpu.sh", tmp_path)
    assert "scripts.tok_train" not in {module(c) for c in cmds}
    mc_base = next(c for c in cmds if module(c) == "scripts.base_train")
    assert "d4-mc" in mc_base and mc_base[-2:] == ["--resume-from-step", "300"]
    quick = commands("runcpu.sh", tmp_path, "--quick")  # --quick keeps its own markers
    assert "scripts.tok_train" in {module(c) for c in quick}


@pytest.mark.parametrize(("gpu", "depth"), [("5090", 10), ("h100", 12)])
@pytest.mark.parametrize("mc", [False, True])
def test_run10_dry_run_one_gpu_every_stage(gpu, depth, mc, tmp_path):
    args = ["--gpu", gpu, *(["--mc"] if mc else []), "--", "--num-iterations", "20"]
    cmds = commands("run10.sh", tmp_path, *args)
    assert [position(cmds, s) for s in ORDER] == sorted(position(cmds, s) for s in ORDER)
    assert position(cmds, "scripts.mc_eval") < position(cmds, "scripts.mid_train")
    assert position(cmds, "scripts.chat_cli") < position(cmds, "nanochat.report generate")
    tag = f"d{depth}-mc" if mc else f"d{depth}"
    heavy = [c for c in cmds if c[0] == "torchrun"]
    assert {module(c) for c in heavy} >= {
        *TRAINING,
        "scripts.base_loss",
        "scripts.mc_eval",
        "scripts.chat_eval",
    }
    for c in heavy:
        assert c[1:5] == ["--standalone", "--nproc-per-node", "1", "-m"]
        torchrun_hands_over(c)
        assert c[c.index("--model-tag") + 1] == tag
        assert ("--mc" in c) == (mc and module(c) in TRAINING)
        if module(c) in TRAINING:  # recipes pass scale; the MC recipe is base_train's default
            assert recipe_settings(c) == (["--mc"] if mc else [])
        assert (c[-2:] == ["--num-iterations", "20"]) == (module(c) in TRAINING)  # extra flags: training only
        if module(c) == "scripts.mc_eval":
            assert ("--views" in c) == (not mc)
    base = next(c for c in heavy if module(c) == "scripts.base_train")
    assert base[base.index("--depth") + 1] == str(depth)


@pytest.mark.parametrize("recipe", ["runcpu.sh", "run10.sh"])
def test_cpu_and_one_gpu_recipes_help_flags_and_shellcheck(recipe, tmp_path):
    text = (REPO / recipe).read_text()
    flags = set(re.findall(r"^\s+(-[-\w]+(?: \| -[-\w]+)*)\)", text, re.M))
    flags = {f for group in flags for f in group.split(" | ")} - {"--"}
    assert {"--dry-run", "--help"} <= flags and len(flags) >= 4
    out = run(recipe, tmp_path, "--help")
    assert out.returncode == 0
    for flag in flags:
        assert re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", out.stdout, re.M), (
            f"--help does not document {flag}"
        )
    bad = run(recipe, tmp_path, "--bogus")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --bogus (see --help)"
    if recipe == "run10.sh":
        nogpu = run(recipe, tmp_path, "--dry-run")
        assert nogpu.returncode == 2 and "--gpu" in nogpu.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    sc = subprocess.run(["shellcheck", "-x", recipe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert sc.returncode == 0, sc.stdout + sc.stderr
