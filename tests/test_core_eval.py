"""CORE scoring on a tiny eval bundle served from a local http.server.

The scorer is checked with a "copy model" whose answer is known for every item: it predicts that the
next character repeats the current one (byte-level tokenizer: one token per character). So a
continuation made of repeats has low loss, and greedy decoding continues any run of one letter.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nanochat import core_eval
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer

MC = [  # copy model picks the choice with repeats: right on the first two, wrong on the third
    {"query": "Pick one:", "choices": ["abcd", "aaaa", "bcda"], "gold": 1},
    {"query": "Pick another:", "choices": ["zzzz", "zyxw"], "gold": 0},
    {"query": "And this:", "choices": ["qqqq", "qrst"], "gold": 1},
]
SCHEMA = [  # the continuation "mmm" after a context ending in m is cheap for the copy model
    {"context_options": ["He said hm", "He said ha"], "continuation": "mmm", "gold": 0},
    {"context_options": ["xo", "xx"], "continuation": "xxx", "gold": 1},
]
LM = [  # greedy copy reproduces a run of the context's last letter, nothing else
    {"context": "aaaa", "continuation": "aaa"},
    {"context": "abab", "continuation": "bbb"},
    {"context": "abab", "continuation": "cc"},
    {"context": "zz", "continuation": "zzzy"},
]
CORE_YAML = """icl_tasks:
- label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
- label: tiny_schema
  dataset_uri: tiny/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: ''
- label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: ''
"""
META_CSV = "Eval Task,Task Category,Random baseline\ntiny_mc,x,40\ntiny_schema,x,50\ntiny_lm,x,0\n"


class CopyModel(torch.nn.Module):
    """Logits favour the current token as the next one (by 5 nats over every other token)."""

    def __init__(self, vocab_size: int, sequence_len: int = 1024):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(sequence_len=sequence_len)

    def forward(self, ids):
        return 5.0 * torch.nn.functional.one_hot(ids, self.vocab_size).float()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(["abc"], MIN_VOCAB_SIZE)  # no merges: one token per byte


def make_bundle_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", CORE_YAML)
        zf.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        for name, items in [("mc", MC), ("schema", SCHEMA), ("lm", LM)]:
            zf.writestr(
                f"eval_bundle/eval_data/tiny/{name}.jsonl", "".join(json.dumps(x) + "\n" for x in items)
            )
    return buf.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served_bundle(tmp_path, monkeypatch):
    """The bundle zip on a localhost HTTP server; NANOCHAT_EVAL_BUNDLE_URL points at it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "eval_bundle.zip").write_bytes(make_bundle_zip())
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv(
        "NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    )
    yield tmp_path / "base"
    server.shutdown()
    server.server_close()


def test_bundle_downloads_once_and_is_cached(served_bundle, monkeypatch):
    bundle = core_eval.get_eval_bundle()
    assert bundle == served_bundle / "eval_bundle"
    assert (bundle / "core.yaml").is_file() and (bundle / "eval_data" / "tiny" / "lm.jsonl").is_file()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/nothing.zip")  # unreachable
    assert core_eval.get_eval_bundle() == bundle  # served from the cache
    assert [p.name for p in served_bundle.iterdir()] == ["eval_bundle"]  # no temp left behind
    tasks = core_eval.load_tasks(bundle)
    assert [(t["label"], t["type"], t["num_fewshot"], t["baseline"]) for t in tasks] == [
        ("tiny_mc", "multiple_choice", 1, 0.4),
        ("tiny_schema", "schema", 0, 0.5),
        ("tiny_lm", "language_modeling", 0, 0.0),
    ]
    assert tasks[0]["delimiter"] == " " and tasks[1]["delimiter"] == ""


def test_unreachable_bundle_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    with pytest.raises(UserError, match="could not download the CORE eval bundle"):
        core_eval.get_eval_bundle()
    assert not (tmp_path / "eval_bundle").exists()


def test_render_prompts():
    shot = {"query": "Q0", "choices": ["x", "y"], "gold": 1}
    assert core_eval.render_prompts(MC[1], "multiple_choice", " ", [shot]) == [
        "Q0 y\n\nPick another: zzzz",
        "Q0 y\n\nPick another: zyxw",
    ]
    assert core_eval.render_prompts(SCHEMA[1], "schema", "", []) == ["xoxxx", "xxxxx"]
    assert core_eval.render_prompts(LM[0], "language_modeling", "", [LM[3]]) == [
        "zzzzzy\n\naaaa",
        "zzzzzy\n\naaaaaaa",
    ]


def test_scoring_matches_the_copy_model(served_bundle, tokenizer):
    model = CopyModel(tokenizer.get_vocab_size())
    out = core_eval.evaluate_core(model, tokenizer, "cpu")
    assert out["results"] == {"tiny_mc": pytest.approx(2 / 3), "tiny_schema": 1.0, "tiny_lm": 0.5}
    assert out["centered"]["tiny_mc"] == pytest.approx((2 / 3 - 0.4) / 0.6)
    assert out["centered"]["tiny_schema"] == pytest.approx(1.0)
    assert out["centered"]["tiny_lm"] == pytest.approx(0.5)
    assert out["CORE"] == pytest.approx(((2 / 3 - 0.4) / 0.6 + 1.0 + 0.5) / 3)


def test_long_prompts_are_cropped_from_the_left(tokenizer):
    """With few-shot text longer than the model's window, the scored end is kept and still right."""
    long_item = {"context": "q" * 50 + "aaaa", "continuation": "aaa"}
    task = {"type": "language_modeling", "delimiter": "", "num_fewshot": 0}
    model = CopyModel(tokenizer.get_vocab_size(), sequence_len=16)
    assert core_eval.evaluate_task(model, tokenizer, [long_item], task, "cpu") == 1.0
    wrong = {"context": "q" * 50 + "aaaa", "continuation": "bbb"}
    assert core_eval.evaluate_task(model, tokenizer, [wrong], task, "cpu") == 0.0


def test_real_gpt_runs_the_bundle(served_bundle, tokenizer):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            sequence_len=64,
            vocab_size=tokenizer.get_vocab_size(),
            n_layer=1,
            n_head=1,
            n_kv_head=1,
            n_embd=32,
        )
    )
    model.init_weights()
    model.eval()
    out = core_eval.evaluate_core(model, tokenizer, "cpu", max_per_task=2)
    assert set(out["results"]) == {"tiny_mc", "tiny_schema", "tiny_lm"}
    assert all(0.0 <= acc <= 1.0 for acc in out["results"].values())


def test_fewshot_examples_are_other_items_and_reproducible(tokenizer):
    """Each prompt's shots are k distinct items other than the one asked, the same on every run."""
    seen = []

    class Recorder(CopyModel):
        def forward(self, ids):
            seen.append(tokenizer.decode(ids[-1].tolist()))
            return super().forward(ids)

    data = [{"context": f"c{i}", "continuation": f"x{i}"} for i in range(6)]
    task = {"type": "language_modeling", "delimiter": "=", "num_fewshot": 3}
    core_eval.evaluate_task(Recorder(tokenizer.get_vocab_size()), tokenizer, data, task, "cpu")
    first, seen[:] = list(seen), []
    core_eval.evaluate_task(Recorder(tokenizer.get_vocab_size()), tokenizer, data, task, "cpu")
    assert seen == first
    for i, prompt in enumerate(first):
        *shots, asked = prompt.removeprefix("<|bos|>").split("\n\n")
        assert asked == f"c{i}=x{i}"
        assert len(shots) == 3 and len(set(shots)) == 3 and asked not in shots
        assert all(shot in {f"c{j}=x{j}" for j in range(6)} for shot in shots)
