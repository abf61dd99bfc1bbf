"""chat_eval end to end on fixture tasks, the python tool in generation, ChatCORE, focus plots, report tables.

The model is a GPT wired by hand into a lookup table (a bigram model): one-hot token embeddings, blocks
that add nothing (zero output projections), and an LM head whose column for token t puts its weight on the
token that must follow t. So what it answers is known in advance, and every score below is exact:
  * after <|assistant_start|>: <|python_start|> (weight 1) - and among the answer letters, B (weight 0.5);
  * <|python_start|> -> "7" -> <|python_end|> -> <|assistant_end|>; <|output_end|> -> <|assistant_end|>.
With the tool live, the completion is `<|python_start|>7<|python_end|><|output_start|>7<|output_end|>`.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from megacontext.config import MCConfig, build_nets
from nanochat.checkpoint_manager import save_checkpoint, tokenizer_id
from nanochat.common import UserError
from nanochat.engine import Engine, ToolEngine, tool_call
from nanochat.gpt import GPT, GPTConfig
from nanochat.report import Report
from nanochat.report_tables import mc_vs_vanilla, results_markdown, split_title, stage_table
from nanochat.tasks.common import Task
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer
from scripts.chat_eval import chatcore, generative_results, load_task
from scripts.focus_plot import LEVEL_COLORS, lod_image, parse_focus_map, plot_focus_maps, png_bytes
from scripts.focus_plot import main as focus_main

ARC = [
    ("Which is a mammal?", ["fish", "whale", "crab", "eel"], "B"),
    ("What melts ice?", ["heat", "cold", "dark", "salt water"], "A"),
    ("Which is a gas?", ["rock", "oxygen", "iron", "wood"], "B"),
    ("What do plants need?", ["plastic", "noise", "light", "glass"], "C"),
]
MMLU = [("2+2?", ["3", "4", "5", "6"], 1), ("Capital of France?", ["Rome", "Oslo", "Bern", "Paris"], 3)]
GSM = [
    ("Tom has 3 apples and gets 4 more. How many?", "3+4=<<3+4=7>>7\n#### 7"),
    ("5-2?", "<<5-2=3>>3\n#### 3"),
]


def wired_model(tok) -> GPT:
    V = tok.get_vocab_size()
    config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=272)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()  # zero output projections: the blocks add nothing
    s, byte = tok.encode_special, lambda c: tok.encode(c)[0]
    nxt = [
        (s("<|assistant_start|>"), s("<|python_start|>"), 1.0),
        (s("<|assistant_start|>"), byte("B"), 0.5),
        (s("<|python_start|>"), byte("7"), 1.0),
        (byte("7"), s("<|python_end|>"), 1.0),
        (s("<|python_end|>"), s("<|assistant_end|>"), 1.0),
        (s("<|output_end|>"), s("<|assistant_end|>"), 1.0),
    ]
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[:, :V] = torch.eye(V)  # token t -> basis vector t
        model.lm_head.weight.zero_()
        for prev, token, weight in nxt:
            model.lm_head.weight[token, prev] = weight
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(["bytes only"], MIN_VOCAB_SIZE)


def write_fixtures(data_dir) -> None:
    data_dir.mkdir()
    rows = {
        "ARC-Easy": [
            {"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
            for i, (q, c, a) in enumerate(ARC)
        ],
        "MMLU": [{"question": q, "subject": "misc", "choices": c, "answer": a} for q, c, a in MMLU],
        "GSM8K": [{"question": q, "answer": a} for q, a in GSM],
    }
    for name, items in rows.items():
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture
def base(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    model = wired_model(tok)
    cfg = MCConfig(block_size=8, wc_budget=32, recent=16, horizon=8)
    gistnet, lensnet = build_nets(cfg, model.config.n_embd)
    meta = {
        "model_config": model.config.to_dict(),
        "tokenizer_id": tokenizer_id(tmp_path / "tokenizer"),
        "mc": cfg.to_dict(),
    }
    mc_state = {"gistnet": gistnet.state_dict(), "lensnet": lensnet.state_dict()}
    save_checkpoint(
        tmp_path / "chatsft_checkpoints" / "d1", 5, model.state_dict(), None, meta, mc_state=mc_state
    )
    write_fixtures(tmp_path / "fixtures")
    return tmp_path


class ToolTask(Task):
    """Passes when the completion shows the tool's output, i.e. the engine ran the call."""

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return 3

    def get_example(self, index):
        return {
            "messages": [
                {"role": "user", "content": f"use the tool {index}"},
                {"role": "assistant", "content": ""},
            ]
        }

    def evaluate(self, conversation, completion):
        return "<|output_start|>7<|output_end|>" in completion


def test_tool_engine_runs_python_calls(tok):
    model = wired_model(tok)
    kw = dict(batch_size=2, num_samples=1, max_new_tokens=12, temperature=0.0, top_k=None, seed=0)
    assert generative_results(ToolEngine(model, tok), ToolTask(), [0, 1, 2], **kw) == [True] * 3
    assert (
        generative_results(Engine(model, tok), ToolTask(), [0, 1, 2], **kw) == [False] * 3
    )  # no tool, no output
    s = tok.encode_special
    ps, pe = s("<|python_start|>"), s("<|python_end|>")
    assert tool_call([9, ps, 40, 41, pe], ps, pe) == [40, 41]
    assert tool_call([ps, 40, pe, 42, pe], ps, pe) is None  # a stray end: nothing was opened since
    assert tool_call([ps, 40], ps, pe) is None


def test_chat_eval_end_to_end_on_fixtures(base):
    from scripts.chat_eval import main

    main(
        [
            "-i",
            "sft",
            "--dataset",
            "real",
            "-a",
            "ARC-Easy|MMLU|GSM8K",
            "--data-dir",
            str(base / "fixtures"),
            "--device-type",
            "cpu",
            "--dtype",
            "float32",
            "--max-new-tokens",
            "12",
            "--batch-size",
            "3",
            "--memory",
            "plain",
        ]
    )
    text = (base / "report" / "chat-evaluation-sft-d1.md").read_text()
    # the model always picks B: ARC 2/4, MMLU 1/2; GSM8K completions never reach "#### N"
    assert "- ARC-Easy: 0.5\n" in text and "- MMLU: 0.5\n" in text and "- GSM8K: 0\n" in text
    expected = chatcore({"ARC-Easy": 0.5, "MMLU": 0.5, "GSM8K": 0.0})
    assert expected == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    # a subset of the tasks (-a): its score is logged under another name, out of the report's ChatCORE column
    assert f"- ChatCORE (these tasks only): {expected:.6g}\n" in text and "- megacontext: on" in text

    # the same through MegaContext sessions (the default for an MC checkpoint): a context-free model must score
    # exactly the same
    main(
        [
            "-i",
            "sft",
            "--dataset",
            "real",
            "-a",
            "ARC-Easy|GSM8K",
            "--data-dir",
            str(base / "fixtures"),
            "--device-type",
            "cpu",
            "--dtype",
            "float32",
            "--max-new-tokens",
            "12",
        ]
    )  # an MC checkpoint: through its memory by default
    text = (base / "report" / "chat-evaluation-sft-mc-session-d1.md").read_text()
    assert "- ARC-Easy: 0.5\n" in text and "- GSM8K: 0\n" in text and "- megacontext: session" in text
    assert (base / "report" / "focus_sft_d1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](report/focus_sft_d1.png)" in text

    with pytest.raises(UserError, match="has no HumanEval"):
        main(
            [
                "-i",
                "sft",
                "-a",
                "HumanEval",
                "--dataset",
                "real",
                "--data-dir",
                str(base / "fixtures"),
                "--device-type",
                "cpu",
            ]
        )
    with pytest.raises(UserError, match="unknown task"):
        main(["-i", "sft", "-a", "Nope", "--device-type", "cpu"])


def decode_png(data: bytes):
    """(width, height, rows of RGB bytes) of an 8-bit RGB, filter-0 PNG as png_bytes writes it."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, (w, h) = 8, b"", (0, 0)
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[r * (3 * w + 1) : (r + 1) * (3 * w + 1)] for r in range(h)]
    assert all(row[0] == 0 for row in rows)
    return w, h, [row[1:] for row in rows]


def test_focus_plot_png(tmp_path):
    lines = ["#0 [L1 0:32][L0 32:40]", "#1 [L2 0:1024][L1 1024:1056][L0 1056:1088]", ""]
    step, entries = parse_focus_map(lines[1])
    assert step == 1 and entries == [(2, 0, 1024), (1, 1024, 1056), (0, 1056, 1088)]
    image = lod_image([parse_focus_map(x)[1] for x in lines[:2]], width=1088, row_height=2)
    assert image.shape == (4, 1088, 3)
    assert tuple(image[0, 10]) == LEVEL_COLORS[1] and tuple(image[0, 35]) == LEVEL_COLORS[0]
    assert tuple(image[0, 500]) == (255, 255, 255)  # not yet in the history at refocus 0
    assert tuple(image[3, 500]) == LEVEL_COLORS[2] and tuple(image[3, 1060]) == LEVEL_COLORS[0]
    w, h, rows = decode_png(png_bytes(image))
    assert (w, h) == (1088, 4) and all(rows[r] == image[r].tobytes() for r in range(h))

    src = tmp_path / "maps.txt"
    src.write_text("\n".join(lines))
    focus_main([str(src), "--width", "64"])
    w, h, _ = decode_png((tmp_path / "maps.png").read_bytes())
    assert w == 64 and h == 2 * 8
    with pytest.raises(UserError, match="no focus maps"):
        plot_focus_maps(["nothing here"], tmp_path / "x.png")


def test_report_tables_rows_columns_and_mc_vs_vanilla(tmp_path):
    report = Report(tmp_path / "report")
    report.log("Base model training", [{"depth": 4, "model_tag": "", "mc": False}, {"val_bpb": 1.2}])
    report.log("Base model evaluation", [{"checkpoint": "/x/base_checkpoints/d4 step 100"}, {"CORE": 0.11}])
    report.log("Base model evaluation (d4-mc)", [{"CORE": 0.12}])
    report.log("Midtraining (d4-mc)", [{"mc": True, "val_bpb": 1.0}])
    report.log(
        "Chat evaluation sft (d4)",
        [{"megacontext": "off"}, {"ARC-Easy": 0.3, "GSM8K": 0.05}, {"ChatCORE": 0.04}],
    )
    report.log(
        "Chat evaluation sft (d4-mc)",
        [{"megacontext": "on"}, {"ARC-Easy": 0.35, "LongDoc": 0.5}, {"ChatCORE": 0.1}],
    )
    report.log("Chat evaluation sft MC session (d4-mc)", [{"megacontext": "session"}, {"LongDoc": 0.9}])
    sections = report.sections()
    assert split_title("Chat evaluation sft (d4-mc)") == ("Chat evaluation sft", "d4-mc")
    table = stage_table(sections).splitlines()
    assert table[0] == "| model | MC | stage | CORE | ARC-Easy | GSM8K | ChatCORE | LongDoc |"
    assert table[2:] == [
        "| d4 | no | BASE | 0.1100 | - | - | - | - |",
        "| d4 | no | SFT | - | 0.3000 | 0.0500 | 0.0400 | - |",
        "| d4-mc | yes | BASE | 0.1200 | - | - | - | - |",
        "| d4-mc | yes | SFT | - | 0.3500 | - | 0.1000 | 0.5000 |",
        "| d4-mc | yes | SFT (MC session) | - | - | - | - | 0.9000 |",
    ]
    versus = mc_vs_vanilla(sections)
    assert "| d4-mc vs d4 | BASE | CORE | 0.1200 | 0.1100 | +0.0100 |" in versus
    assert "| d4-mc vs d4 | SFT | ChatCORE | 0.1000 | 0.0400 | +0.0600 |" in versus
    assert "LongDoc" not in versus  # only metrics both models have
    assert "## MegaContext vs vanilla" in results_markdown(sections)
    assert mc_vs_vanilla([s for s in sections if "mc" not in s[0]]) == ""


def test_longdoc_puts_every_fact_8x_the_budget_back():
    """LongDoc's document is sized per checkpoint so that every fact lies at least 8x the working-context budget
    before its question: the MC model's own budget, or for a vanilla model the budget its MC twin would have."""
    from megacontext.config import scale
    from scripts.chat_eval import LONGDOC_REACH, longdoc_size

    class Words:  # one token per word: enough to measure distances
        def encode(self, s):
            return s.split()

    mc_meta = {"mc": {"wc_budget": 128}, "model_config": {"sequence_len": 512}}
    vanilla_meta = {"model_config": {"sequence_len": 512}}
    assert longdoc_size(mc_meta) == longdoc_size(vanilla_meta) >= LONGDOC_REACH * scale(512).wc_budget
    task = load_task("LongDoc", None, longdoc_size(mc_meta), 0, Words())
    for i in range(5):
        conversation = task[i]
        question = conversation["messages"][-2]["content"]
        answer = conversation["answer"]
        words = " ".join(m["content"] for m in conversation["messages"][:-1]).split()
        q_at = len(words) - len(question.split())
        fact = next(w for w, s in enumerate(words) if s.rstrip(".") == answer)
        assert q_at - fact >= LONGDOC_REACH * 128, (q_at, fact)
