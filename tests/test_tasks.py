"""Chat tasks: loaders on hub-schema fixtures, scorers, mixtures, tool parts, and rendering masks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from nanochat.common import UserError
from nanochat.execution import python_tool
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task, TaskMixture, TaskSequence, extract_final_answer, load_hf_dataset
from nanochat.tasks.gsm8k import GSM8K, answer_to_parts
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.longdoc import LongDoc
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.offline import Arithmetic, Identity, calc, offline_mixture
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import TEST_WORDS, TRAIN_WORDS, SpellingBee
from nanochat.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))


class Numbers(Task):
    """Example i is a one-turn conversation holding the number i."""

    def __init__(self, n: int, tag: str = "n", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}]}


def ids(task) -> list[str]:
    return [conv["messages"][0]["content"] for conv in task]


def test_task_slicing():
    assert ids(Numbers(10)) == [f"n{i}" for i in range(10)]
    assert ids(Numbers(10, start=2, stop=9, step=3)) == ["n2", "n5", "n8"]
    assert ids(Numbers(5, stop=100)) == [f"n{i}" for i in range(5)]  # stop is clipped to the data
    assert len(Numbers(10, start=10)) == 0
    sliced = Numbers(10, start=1, step=2)
    assert len(sliced) == 5 and sliced[-1]["messages"][0]["content"] == "n9"
    with pytest.raises(IndexError):
        sliced[5]
    with pytest.raises(ValueError):
        Numbers(10, step=0)


def test_mixture_is_a_deterministic_shuffle():
    tasks = [Numbers(30, "a"), Numbers(20, "b")]
    mix = TaskMixture(tasks, seed=1)
    order = ids(mix)
    assert order == ids(TaskMixture([Numbers(30, "a"), Numbers(20, "b")], seed=1))  # same seed, same order
    assert order != ids(TaskMixture(tasks, seed=2))
    assert sorted(order) == sorted(ids(tasks[0]) + ids(tasks[1]))  # every example exactly once
    assert order[:10] != sorted(order[:10])  # actually shuffled, both tasks spread through
    assert {x[0] for x in order[:15]} == {"a", "b"}
    task, i = mix.locate(0)
    assert task[i] == mix[0]
    assert len(TaskMixture([tasks[1], tasks[1]])) == 40  # a task passed twice is oversampled
    assert ids(TaskSequence(tasks)) == ids(tasks[0]) + ids(tasks[1])
    assert ids(TaskMixture(tasks, seed=1, stop=5)) == order[:5]


def test_arc_loader_and_scorer():
    arc = ARC("ARC-Easy", "test", data_files=str(FIXTURES / "arc.jsonl"))
    assert arc.eval_type == "categorical" and len(arc) == 3
    first = arc[0]
    user, assistant = first["messages"][0]["content"], first["messages"][1]["content"]
    assert user.startswith("Which part of a plant takes in water")
    assert "A. leaves\nB. roots\nC. flowers\nD. seeds" in user
    assert assistant == "B" and first["letters"] == ["A", "B", "C", "D"]
    assert arc[1]["messages"][1]["content"] == "B"  # numeric labels "1".."4" re-lettered by position
    assert arc[2]["letters"] == list("ABCDE") and "E. a rock" in arc[2]["messages"][0]["content"]
    assert arc.evaluate(first, "B") and arc.evaluate(first, " B. roots")
    assert not arc.evaluate(first, "A") and not arc.evaluate(first, "") and not arc.evaluate(first, "Because")
    with pytest.raises(ValueError):
        ARC("ARC-Hard", "test")


def test_mmlu_loader_and_scorer(tmp_path):
    mmlu = MMLU("all", "test", data_files=str(FIXTURES / "mmlu.jsonl"))
    conv = mmlu[1]
    assert conv["messages"][0]["content"].startswith("A question about anatomy.")
    assert conv["messages"][1]["content"] == "C" and conv["subject"] == "anatomy"
    assert mmlu.evaluate(conv, "C") and not mmlu.evaluate(conv, "B")
    aux = MMLU("auxiliary_train", "train", data_files=str(FIXTURES / "mmlu_aux.jsonl"))
    assert aux[0]["messages"][1]["content"] == "A"  # the "train" wrapper is unwrapped
    # The same rows as parquet go through the parquet builder.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "mmlu.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu.parquet")
    assert MMLU("all", "test", data_files={"test": str(tmp_path / "mmlu.parquet")})[1] == conv
    # An injected dataset object is used as-is.
    assert MMLU("all", "test", dataset=rows)[1] == conv


def test_load_errors_are_user_errors():
    with pytest.raises(UserError, match="json"):
        load_hf_dataset("x/y", None, "train", data_files="rows.txt")


def test_gsm8k_calc_annotations_become_tool_calls():
    parts = answer_to_parts("She has 3 * 12 = <<3*12=36>>36 pencils.\nThen <<5>>five.\n#### 36")
    assert parts == [
        {"type": "text", "text": "She has 3 * 12 = "},
        {"type": "python", "text": "3*12"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "36 pencils.\nThen five.\n#### 36"},  # no '=': dropped, text joined
    ]
    gsm = GSM8K("main", "test", data_files=str(FIXTURES / "gsm8k.jsonl"))
    assert len(gsm) == 2 and gsm.eval_type == "generative"
    conv = gsm[1]
    content = conv["messages"][1]["content"]
    assert [p["type"] for p in content] == ["text", "python", "python_output"] * 2 + ["text"]
    assert [p["text"] for p in content if p["type"] == "python"] == ["2*1250", "1250+2500"]
    assert content[-1]["text"].endswith("#### 3,750")
    # The tool really produces what the annotation says (integer arithmetic).
    assert python_tool("2*1250") == "2500"
    assert gsm.evaluate(conv, "so the total is 3750.\n#### 3750")
    assert gsm.evaluate(conv, "#### 3,750")
    assert not gsm.evaluate(conv, "#### 3751") and not gsm.evaluate(conv, "3750")  # no marker, no credit
    assert extract_final_answer("#### 12\nmore\n#### -4.5") == "-4.5"


def test_humaneval_runs_real_tests_in_the_sandbox():
    he = HumanEval(data_files=str(FIXTURES / "humaneval.jsonl"), timeout_s=3.0)
    conv = he[0]
    assert conv["entry_point"] == "running_max" and conv["messages"][0]["content"].startswith("from typing")
    reference = conv["messages"][1]["content"]
    assert he.evaluate(conv, reference)
    fenced = "Here you go:\n```python\ndef running_max(numbers):\n    return [max(numbers[: i + 1]) for i in range(len(numbers))]\n```\n"
    assert he.evaluate(conv, fenced)
    assert not he.evaluate(conv, "```python\ndef running_max(numbers):\n    return sorted(numbers)\n```")
    pal = he[1]
    assert he.evaluate(
        pal, "    return text == ''.join(reversed(text))\n"
    )  # a bare body continues the prompt
    assert not he.evaluate(pal, "    return True\n")
    assert not he.evaluate(pal, "    while True:\n        pass\n")  # killed by the timeout, scored as a fail


def test_smoltalk_loader():
    st = SmolTalk("train", data_files=str(FIXTURES / "smoltalk.jsonl"))
    assert len(st) == 3
    assert [m["role"] for m in st[0]["messages"]] == ["system", "user", "assistant"]
    assert st[1]["messages"][3] == {"role": "assistant", "content": "8."}
    with pytest.raises(ValueError, match="row 2"):
        st[2]  # ends with the user: refused, not trained on
    with pytest.raises(NotImplementedError):
        st.evaluate(st[0], "Red.")


def test_spellingbee_is_correct_and_deterministic():
    bee = SpellingBee(60, "train", seed=3)
    assert [bee[i] for i in range(60)] == [SpellingBee(60, "train", seed=3)[i] for i in range(60)]
    assert not set(TRAIN_WORDS) & set(TEST_WORDS)
    assert {bee[i]["word"] for i in range(60)} <= set(TRAIN_WORDS)
    kinds = {bee[i]["kind"] for i in range(60)}
    assert kinds == {"spell", "count"}
    for i in range(60):
        conv = bee[i]
        word, answer = conv["word"], conv["messages"][1]["content"]
        if conv["kind"] == "spell":
            assert answer.endswith("-".join(word) + ".")
            assert bee.evaluate(conv, answer) and not bee.evaluate(conv, "-".join(word[::-1]) + "x-y")
            continue
        letter = re.search(r"count\('(.)'\)", answer[1]["text"]).group(1)
        assert answer[2] == {"type": "python_output", "text": str(word.count(letter))}
        assert answer[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert bee.evaluate(conv, f"#### {word.count(letter)}") and not bee.evaluate(conv, "#### 99")
    counting = next(bee[i] for i in range(60) if bee[i]["kind"] == "count")
    call = counting["messages"][1]["content"][1]["text"]
    assert python_tool(call) == counting["messages"][1]["content"][2]["text"]  # data == the real tool


def test_longdoc_facts_early_questions_late():
    doc_size = 3000
    task = LongDoc(8, "test", seed=1, doc_size=doc_size, n_facts=4, n_questions=3)
    assert [task[i] for i in range(8)] == [
        LongDoc(8, "test", seed=1, doc_size=doc_size, n_facts=4, n_questions=3)[i] for i in range(8)
    ]
    assert task[0] != LongDoc(8, "train", seed=1, doc_size=doc_size)[0]
    for i in range(8):
        conv = task[i]
        messages = conv["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        doc = messages[0]["content"].split("<document>\n")[1].split("\n</document>")[0]
        assert doc_size <= len(doc) <= doc_size + 400
        for question, answer in zip(messages[2::2], messages[3::2]):
            label = re.search(r"the ([a-z]+ [a-z]+)\?$", question["content"]).group(1)
            fact = re.search(rf"[^.]*\b{label}\b[^.]*\.", doc)
            assert fact and fact.group(0).strip() == answer["content"]  # the answer: the document's sentence
            assert fact.end() <= 0.3 * len(doc)  # early: far from the questions at the end
            assert len(re.findall(rf"\b{label}\b", doc)) == 1  # one fact per label, no contradictions
        value, others = conv["answer"], conv["others"]
        assert value in messages[-1]["content"] and len(others) >= 2
        assert task.evaluate(conv, " " + messages[-1]["content"])
        assert task.evaluate(conv, value) and task.evaluate(conv, f"It is {value.upper()}.")
        assert not task.evaluate(conv, value + "0")  # a word, not a prefix
        assert not task.evaluate(conv, "I do not know.")
        assert not task.evaluate(conv, f"{value} or {others[0]}")  # naming every value does not pass


def test_longdoc_size_by_token_count():
    words = lambda s: len(s.split())
    conv = LongDoc(1, doc_size=500, count=words)[0]
    doc = conv["messages"][0]["content"].split("<document>\n")[1].split("\n</document>")[0]
    assert 500 <= words(doc) <= 560


def test_arithmetic_uses_the_calculator_tool():
    task = Arithmetic(40, "train", seed=0)
    for i in range(40):
        conv = task[i]
        parts = conv["messages"][1]["content"]
        calls = [p for p in parts if p["type"] == "python"]
        outputs = [p for p in parts if p["type"] == "python_output"]
        assert len(calls) == len(outputs) == 1
        value = calc(calls[0]["text"])
        assert outputs[0]["text"] == str(value) and parts[-1]["type"] == "text"
        assert task.evaluate(conv, f"#### {value}") and not task.evaluate(conv, f"#### {value + 1}")
    # The data matches what the sandboxed tool prints, division included (a float: '12.0').
    for i in range(3):
        parts = task[i]["messages"][1]["content"]
        call, output = (
            next(p for p in parts if p["type"] == "python"),
            next(p for p in parts if p["type"] == "python_output"),
        )
        assert python_tool(call["text"]) == output["text"]
    assert python_tool("84/7") == str(calc("84/7")) == "12.0"
    with pytest.raises(ValueError):
        calc("__import__('os')")


def test_offline_mixture():
    mix = offline_mixture("train", 50, seed=0, longdoc_size=800)
    again = offline_mixture("train", 50, seed=0, longdoc_size=800)
    assert len(mix) == 50 and [mix[i] for i in range(50)] == [again[i] for i in range(50)]
    assert [mix[i] for i in range(50)] != [
        offline_mixture("train", 50, seed=1, longdoc_size=800)[i] for i in range(50)
    ]
    sources = [type(mix.locate(i)[0]).__name__ for i in range(50)]
    assert {s: sources.count(s) for s in set(sources)} == {
        "Identity": 7,
        "SpellingBee": 12,
        "Arithmetic": 16,
        "LongDoc": 15,
    }
    identity = Identity(20)
    for i in range(20):
        conv = identity[i]
        assert conv["messages"][-2]["role"] == "user"
        assert identity.evaluate(conv, conv["messages"][-1]["content"])
    assert not identity.evaluate(identity[0], "I am ChatGPT.")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny BPE trained on a few KB of the tasks' own text (vocab 300)."""
    rng = random.Random(0)
    texts = [json.dumps(offline_mixture("train", 20, seed=0, longdoc_size=400)[i]) for i in range(20)]
    texts += [(FIXTURES / name).read_text() for name in ("arc.jsonl", "gsm8k.jsonl", "humaneval.jsonl")]
    rng.shuffle(texts)
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


def all_task_examples() -> list[tuple[str, dict]]:
    return [
        ("arc", ARC("ARC-Challenge", "test", data_files=str(FIXTURES / "arc.jsonl"))[0]),
        ("mmlu", MMLU("all", "test", data_files=str(FIXTURES / "mmlu.jsonl"))[0]),
        ("gsm8k", GSM8K("main", "test", data_files=str(FIXTURES / "gsm8k.jsonl"))[0]),
        ("humaneval", HumanEval(data_files=str(FIXTURES / "humaneval.jsonl"))[0]),
        ("smoltalk", SmolTalk(data_files=str(FIXTURES / "smoltalk.jsonl"))[0]),
        ("spellingbee", next(c for c in SpellingBee(20) if c["kind"] == "count")),
        ("longdoc", LongDoc(1, doc_size=600)[0]),
        ("identity", Identity(1)[0]),
        ("arithmetic", Arithmetic(1)[0]),
    ]


def spans(ids: list[int], open_id: int, close_id: int) -> list[range]:
    """Index ranges of each open ... close pair, markers included."""
    out, start = [], None
    for i, t in enumerate(ids):
        if t == open_id:
            start = i
        elif t == close_id and start is not None:
            out.append(range(start, i + 1))
            start = None
    return out


def test_every_task_renders_with_tool_outputs_masked(tokenizer):
    names = ("user_start", "user_end", "python_start", "python_end", "output_start", "output_end")
    sp = {n: tokenizer.encode_special(n) for n in names}
    for name, conv in all_task_examples():
        ids, mask = tokenizer.render_conversation(conv)
        assert len(ids) == len(mask) and sum(mask) > 0, name
        trained = tokenizer.decode([t for t, k in zip(ids, mask) if k])
        untrained = tokenizer.decode([t for t, k in zip(ids, mask) if not k])
        for m in conv["messages"]:
            parts = (
                m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            )
            for part in parts:
                if m["role"] == "assistant" and part["type"] in ("text", "python"):
                    assert part["text"] in trained, (name, part)
                else:  # user/system text and tool outputs: in the ids, not trained on (spans checked below)
                    assert part["text"] in untrained, (name, part)
        outputs = [
            p["text"]
            for m in conv["messages"]
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "python_output"
        ]
        output_spans = spans(ids, sp["output_start"], sp["output_end"])
        assert [tokenizer.decode(ids[r.start + 1 : r.stop - 1]) for r in output_spans] == outputs, name
        assert all(mask[i] == 0 for r in output_spans for i in r), f"{name}: a tool output is trained on"
        user_spans = spans(ids, sp["user_start"], sp["user_end"])
        assert user_spans and all(mask[i] == 0 for r in user_spans for i in r), name
        python_spans = spans(ids, sp["python_start"], sp["python_end"])
        assert len(python_spans) == len(outputs), name
        assert all(mask[i] == 1 for r in python_spans for i in r), f"{name}: a tool call is not trained on"
