"""Synthetic long-context tasks: seeded, answer where it belongs, distance controlled, real distractors."""

import random
import re

import pytest

from nanochat.tasks import copy_warmup, longctx

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def words(s: str) -> int:
    """A stand-in token counter (any str -> int function works)."""
    return len(s.split())


@pytest.mark.parametrize("task", sorted(longctx.TASKS))
def test_seeded_and_deterministic(task):
    a = longctx.make_examples(task, 3, 800, seed=7)
    assert a == longctx.make_examples(task, 3, 800, seed=7)
    assert a != longctx.make_examples(task, 3, 800, seed=8)
    assert len({ex["prompt"] for ex in a}) == 3  # examples differ from each other
    for ex in a:
        assert ex["task"] == task
        assert ex["answer"].startswith(" ") and not ex["prompt"].endswith(" ")
        assert ex["answer"].strip() not in ex["prompt"][-200:]  # the answer is not in the recent text


@pytest.mark.parametrize("kind,pattern", [("digits", r"\d{6}"), ("uuid", UUID_RE)])
def test_passkey_answer_distractors_and_distance(kind, pattern):
    for i in range(5):
        ex = longctx.passkey(random.Random(i), 1500, prefix=600, key_kind=kind, n_distractors=3)
        prompt, key = ex["prompt"], ex["answer"][1:]
        assert re.fullmatch(pattern, key)
        label = re.search(
            r"What is the pass key for the ([a-z]+ [a-z]+)\? The pass key for the \1 is$", prompt
        )
        assert label, prompt[-120:]
        statements = re.findall(rf"The pass key for the ([a-z]+ [a-z]+) is ({pattern})\.", prompt)
        assert len(statements) == 4 and len({s[0] for s in statements}) == 4
        assert (label.group(1), key) in statements
        distractors = [k for lab, k in statements if lab != label.group(1)]
        assert len(distractors) == 3 and key not in distractors  # same form, different keys
        assert sorted(ex["decoys"]) == sorted(distractors)  # the look-alikes mc_eval checks for
        assert prompt.count(key) == 2  # only in the evidence ("... is KEY. Remember it: KEY is ...")
        # The reported distance is the real gap between the evidence and the question.
        evidence = f"Remember it: {key} is the pass key for the {label.group(1)}."
        ev_end = prompt.index(evidence) + len(evidence)
        q_start = prompt.index("What is the pass key")
        assert q_start - ev_end == ex["distance_chars"]
        a, b = ex["evidence_chars"]  # the whole key sentence: label and key, both mentions
        assert b == ev_end and prompt[a:b] == f"The pass key for the {label.group(1)} is {key}. " + evidence
        assert 1500 <= ex["distance_chars"] <= 1500 + 200 and ex["distance_tokens"] is None
        assert (
            prompt.index(f"The pass key for the {label.group(1)}") >= 600
        )  # prefix filler before the evidence


@pytest.mark.parametrize("task", sorted(longctx.TASKS))
def test_distance_in_chars_is_tight(task):
    kw = {
        "passkey": {"n_distractors": 0},
        "mqar": {"n_pairs": 4},
        "vartrack": {"n_hops": 1, "n_distractor_chains": 0},
    }
    for distance in (200, 2000, 20000):
        ex = longctx.TASKS[task](random.Random(distance), distance, **kw[task])
        # At least the distance, overshooting by at most one filler sentence (plus the rest of the MQAR block).
        assert distance <= ex["distance_chars"] <= distance + 200 + (60 if task == "mqar" else 0), ex[
            "distance_chars"
        ]


@pytest.mark.parametrize("task", sorted(longctx.TASKS))
def test_distance_by_token_counter(task):
    for distance in (100, 1000):
        ex = longctx.TASKS[task](random.Random(1), distance, prefix=50, count=words)
        assert distance <= ex["distance_tokens"] <= distance + 40
        assert ex["distance_chars"] > ex["distance_tokens"]  # both reported
        assert words(ex["prompt"]) >= distance + 50


def test_mqar_pairs_queries_and_answer():
    for n_pairs in (8, 16):
        ex = longctx.mqar(random.Random(n_pairs), 3000, n_pairs=n_pairs)
        prompt = ex["prompt"]
        block, _, rest = prompt.partition("Now recall the pairs.")
        assert rest, "no query section"
        pairs = dict(re.findall(r"([a-z]+-[a-z]+): (\d{4})\.", block))
        assert len(pairs) == n_pairs and len(set(pairs.values())) == n_pairs
        recalled = re.findall(r"([a-z]+-[a-z]+): (\d{4})\.", rest)
        assert len(recalled) == n_pairs - 1 and all(pairs[k] == v for k, v in recalled)
        last = re.search(r"([a-z]+-[a-z]+):$", prompt).group(1)
        assert last in pairs and last not in dict(recalled)
        assert ex["answer"] == " " + pairs[last]
        pair = f"{last}: {pairs[last]}."
        assert prompt.index("Now recall") - (block.index(pair) + len(pair)) == ex["distance_chars"]
        assert prompt[slice(*ex["evidence_chars"])] == pair
        assert 3000 <= ex["distance_chars"] <= 3000 + 200 + 20 * n_pairs
    with pytest.raises(ValueError):
        longctx.mqar(random.Random(0), 100, n_pairs=4, n_queries=5)


def test_vartrack_chain_resolves_to_answer():
    for seed in range(5):
        ex = longctx.vartrack(random.Random(seed), 2500, n_hops=4, n_distractor_chains=2)
        prompt = ex["prompt"]
        env = {}
        for name, value in re.findall(r"VAR ([A-Z]{4}) = (\d{5}|VAR [A-Z]{4})\.", prompt):
            env[name] = env[value[4:]] if value.startswith("VAR ") else value  # assignments come in order
        target = re.search(r"What is the value of VAR ([A-Z]{4})\?", prompt).group(1)
        assert ex["answer"] == " " + env[target]
        values = {v for v in env.values()}
        assert len(values) == 3  # two distractor chains of the same form with other values
        assert sorted(ex["decoys"]) == sorted(values - {env[target]})  # their values are the look-alikes
        assert len(env) == 15  # 3 chains x 5 variables
        evidence = f"VAR {[k for k, v in env.items() if v == env[target]][0]} = {env[target]}."
        assert (
            prompt.index("What is the value") - (prompt.index(evidence) + len(evidence))
            == ex["distance_chars"]
        )
        assert prompt[slice(*ex["evidence_chars"])] == evidence
        assert 2500 <= ex["distance_chars"] <= 2500 + 200


def test_filler_from_texts_and_avoid():
    source = ["The harbour lights came on one by one. " * 3 + "Gulls argued loudly over the nets today.",
              "Code 123456 opened the old vault door. The tide went out slowly that evening."]  # fmt: skip
    filler = longctx.Filler(random.Random(0), source)
    seen = {filler.sentence(avoid=("123456",)) for _ in range(50)}
    assert seen <= set(longctx.split_sentences(source)) and not any("123456" in s for s in seen)
    ex = longctx.passkey(random.Random(0), 300, filler_texts=source, n_distractors=0)
    assert "Gulls argued loudly over the nets today." in ex["prompt"]
    with pytest.raises(ValueError):
        longctx.Filler(random.Random(0), ["too short"])


def test_generated_filler_is_varied_and_digit_free():
    rng = random.Random(0)
    sentences = [longctx.make_sentence(rng) for _ in range(200)]
    assert len(set(sentences)) > 190
    assert not any(ch.isdigit() for s in sentences for ch in s)


def test_training_documents():
    docs = longctx.training_documents(30, seed=3, min_chars=500, max_chars=4000)
    assert docs == longctx.training_documents(30, seed=3, min_chars=500, max_chars=4000)
    assert all(300 <= len(d) <= 6000 for d in docs), [len(d) for d in docs]
    kinds = {
        "passkey": "What is the pass key",
        "mqar": "Now recall the pairs.",
        "vartrack": "What is the value",
    }
    for name, marker in kinds.items():
        assert any(marker in d for d in docs), name
    for d in docs:  # the answer is included at the end
        if "What is the pass key" in d:
            label = re.search(r"What is the pass key for the ([a-z]+ [a-z]+)\?", d).group(1)
            key = re.search(rf"The pass key for the {label} is ([^ ]+)\. Remember", d).group(1)
            assert d.endswith(f"The pass key for the {label} is {key}.")


def test_copy_drill_repeats_each_listing_after_filler():
    for i in range(20):
        d = longctx.copy_drill(random.Random(i), 2000)
        assert len(d) >= 2000 and d.startswith("Codes: ")
        rounds = re.findall(r"Codes: (.+?)\. (.*?)Repeat the codes: (.+?)\.(?: |$)", d, flags=re.S)
        assert len(rounds) == d.count("Repeat the codes: ") >= 1
        for listing, gap, repeat in rounds:
            assert listing == repeat  # a repeat is predictable only from its listing
            codes = listing.split(", " if ", " in listing else " ")
            assert 3 <= len(codes) <= 40 and not any(c in gap for c in codes)  # no code leaks into filler
    docs = longctx.training_documents(200, seed=5, min_chars=500, max_chars=4000)
    n_drills = sum(d.startswith("Codes: ") for d in docs)
    assert abs(n_drills / len(docs) - longctx.COPY_DRILL_FRAC) < 0.1


class CharTokenizer:
    """One id per character (BOS = 0): enough to test row shaping without a trained tokenizer."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, text: str, prepend: int | None = None) -> list[int]:
        return ([prepend] if prepend is not None else []) + [ord(c) + 1 for c in text]


@pytest.mark.parametrize("length", [1025, 2049])
def test_training_row_is_the_end_of_a_document_cropped_little(length, monkeypatch):
    tok, made = CharTokenizer(), []
    real = longctx.training_document
    monkeypatch.setattr(longctx, "training_document", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    crops = []
    for i in range(20):
        made.clear()
        row = longctx.training_row(random.Random(i), tok, length)
        assert len(row) == length
        text = "".join(chr(t - 1) if t else "" for t in row)
        docs = [d for d in made if ("\0" + d).endswith(text)]  # BOS is id 0 (decoded as "")
        assert docs, "the row is not the end of a generated document"
        crops.append(1 - length / (min(len(d) for d in docs) + 1))
    assert sorted(crops)[len(crops) // 2] <= 0.12  # most rows lose at most ~10 % from the front


def parse_pairs(r: list[int]) -> list[int]:
    """Segment lengths of a row made of (segment, segment) pairs; the last pair may be cut."""
    lo, hi = copy_warmup.COPY_SEGMENT
    n, lengths = 0, []
    while n + 2 * hi <= len(r):
        found = [L for L in range(lo, hi) if r[n : n + L] == r[n + L : n + 2 * L]]
        assert found, f"no repeated segment at {n}"
        lengths.append(found[0])
        n += 2 * found[0]
    return lengths


def test_copy_warmup_batch_is_short_rows_of_segments_each_followed_by_itself():
    import torch

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4096, (6, 513), generator=g)
    x, y = copy_warmup.copy_warmup_batch(rows[:, :-1], rows[:, 1:], seed=1)
    L = copy_warmup.COPY_ROW_LEN
    assert x.shape == y.shape == (6 * 512 // L, L)  # the same tokens per step, in short rows
    full = torch.cat([x, y[:, -1:]], dim=1)
    assert torch.equal(full[:, 1:], y)
    offsets = {n for r in full.tolist() for n in parse_pairs(r)}
    assert len(offsets) >= 5  # the look-back distance varies: no fixed positional shortcut
    lo, hi = copy_warmup.COPY_WARMUP_IDS
    assert int(full.min()) >= lo and int(full.max()) < hi
    x2, _ = copy_warmup.copy_warmup_batch(rows[:, :-1], rows[:, 1:], seed=1)
    assert torch.equal(x, x2)  # seeded by the batch content and seed
    x3, _ = copy_warmup.copy_warmup_batch(rows[:, :-1], rows[:, 1:], seed=2)
    assert not torch.equal(x, x3)


def test_copy_warmup_ids_fit_a_small_vocabulary():
    import torch

    rows = torch.zeros(2, 129, dtype=torch.long)
    x, y = copy_warmup.copy_warmup_batch(rows[:, :-1], rows[:, 1:], seed=0, vocab_size=300)
    assert int(x.min()) >= 150 and int(torch.cat([x, y], 1).max()) < 300
    x, _ = copy_warmup.copy_warmup_batch(rows[:, :-1], rows[:, 1:], seed=0, vocab_size=4096)
    assert int(x.min()) >= copy_warmup.COPY_WARMUP_IDS[0]
