"""Engine: KV-cached decoding equals full recomputation (batched, ragged), sampling rules, stopping."""

import pytest
import torch

from nanochat.engine import Engine, KVCache, sample_next_token
from nanochat.gpt import GPT, GPTConfig

V = 64
BOS, ASSISTANT_END = 0, 1


class FakeTokenizer:
    """Just the special ids the engine asks for (the engine never encodes or decodes text)."""

    def __init__(self, bos=BOS, assistant_end=ASSISTANT_END):
        self.bos, self.assistant_end = bos, assistant_end

    def get_bos_token_id(self):
        return self.bos

    def encode_special(self, name):
        return {"<|bos|>": self.bos, "<|assistant_end|>": self.assistant_end}[name]


@pytest.fixture(scope="module", params=[0, 1, 3], ids=["plain", "smear", "smear3"])
def model(request):
    torch.manual_seed(0)
    width = max(1, request.param)
    config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    config.smear, config.smear_width = request.param > 0, width
    m = GPT(config)
    m.init_weights()
    with torch.no_grad():  # the init zeroes the output projections (and the smear); make every layer matter
        if request.param:
            torch.nn.init.normal_(m.smear, std=0.5)
        if width > 1:
            torch.nn.init.normal_(m.smear_back, std=0.5)
        for block in m.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)
        torch.nn.init.normal_(m.lm_head.weight, std=0.5)
    return m.eval()


PROMPTS = [[5, 9, 14], [7, 3, 22, 40, 41, 8, 12], [30, 31, 32, 33, 34]]  # ragged


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def naive_greedy(model, prompt, steps, stops=(BOS, ASSISTANT_END)):
    ids = list(prompt)
    for _ in range(steps):
        token = int(full_logits(model, ids).argmax())
        if token in stops:
            break
        ids.append(token)
    return ids


@pytest.mark.parametrize("prompts", [PROMPTS, [[5, 9, 14, 2], [7, 3, 22, 40]]], ids=["ragged", "equal"])
def test_kv_cached_logits_equal_full_recompute(model, prompts):
    engine = Engine(model, FakeTokenizer())
    cache, logits = engine.prefill(prompts, seq_len=16)
    assert cache.has_padding() == (prompts is PROMPTS)
    seqs = [list(p) for p in prompts]
    for step in range(6):
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(logits[b], full_logits(model, seq), rtol=1e-4, atol=1e-4)
        new = [(11 * step + 3 * b + 2) % V for b in range(len(seqs))]
        for seq, t in zip(seqs, new):
            seq.append(t)
        logits = engine.decode_step(cache, torch.tensor(new))


def test_pad_content_does_not_leak(model):
    # Whatever sits in the pad slots, the real rows' logits must not change.
    engine = Engine(model, FakeTokenizer(bos=BOS))
    other = Engine(model, FakeTokenizer(bos=17))  # pads with a different token id
    _, a = engine.prefill(PROMPTS, 16)
    _, b = other.prefill(PROMPTS, 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_truncate_then_decode_matches_recompute(model):
    engine = Engine(model, FakeTokenizer())
    cache, _ = engine.prefill(PROMPTS, seq_len=16)
    prompt_pos = cache.get_pos()
    for t in (4, 5, 6):
        engine.decode_step(cache, torch.tensor([t] * 3))
    cache.truncate(prompt_pos + 1)  # keep the first decoded token (4), forget 5 and 6
    logits = engine.decode_step(cache, torch.tensor([9, 10, 11]))
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(
            logits[b], full_logits(model, p + [4, [9, 10, 11][b]]), rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError):
        cache.truncate(cache.get_pos() + 1)


def test_cache_grows_when_outrun(model):
    engine = Engine(model, FakeTokenizer())
    cache, _ = engine.prefill([PROMPTS[1]], seq_len=2)  # smaller than the prompt itself
    seq = list(PROMPTS[1])
    for t in (3, 4, 5):
        logits = engine.decode_step(cache, torch.tensor([t]))
        seq.append(t)
    torch.testing.assert_close(logits[0], full_logits(model, seq), rtol=1e-4, atol=1e-4)
    assert cache.kv.size(4) >= cache.get_pos() == len(seq)


def test_kvcache_mask_hides_pads_and_future():
    cache = KVCache(2, 1, 8, 4, 1, pad_lens=[2, 0])
    mask = cache.attn_mask(4)[:, 0]
    assert mask.shape == (2, 4, 4)
    assert not mask[0, 2:, :2].any() and mask[0, 3, 2:].all()  # real queries skip the pads
    assert mask[0, 0, 0] and mask[0, 1, 1]  # a pad query sees only itself (no empty softmax row)
    assert torch.equal(mask[1], torch.ones(4, 4, dtype=torch.bool).tril())
    assert cache.positions(4).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_greedy_generation_matches_naive_and_is_deterministic(model):
    engine = Engine(model, FakeTokenizer())
    results, masks = engine.generate_batch(PROMPTS, max_tokens=8, temperature=0.0)
    again, _ = engine.generate_batch(PROMPTS, max_tokens=8, temperature=0.0, seed=123)
    assert results == again
    for prompt, result, mask in zip(PROMPTS, results, masks):
        assert result == naive_greedy(model, prompt, 8)
        assert mask == [0] * len(prompt) + [1] * (len(result) - len(prompt))
    assert any(len(r) > len(p) for r, p in zip(results, PROMPTS))


def test_num_samples_and_seeded_sampling(model):
    engine = Engine(model, FakeTokenizer())
    greedy, _ = engine.generate_batch(PROMPTS[0], num_samples=3, max_tokens=6, temperature=0.0)
    assert greedy[0] == greedy[1] == greedy[2] == naive_greedy(model, PROMPTS[0], 6)
    a, _ = engine.generate_batch(PROMPTS[0], num_samples=4, max_tokens=6, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(PROMPTS[0], num_samples=4, max_tokens=6, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(PROMPTS[0], num_samples=4, max_tokens=6, temperature=1.0, seed=2)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1  # samples of one prompt differ


def test_top_k_is_respected():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(0)
    allowed = logits.topk(3, dim=-1).indices
    seen = set()
    for _ in range(200):
        t = sample_next_token(logits, rng, temperature=2.0, top_k=3)
        assert (allowed == t[:, None]).any(dim=-1).all()
        seen.update(t.tolist())
    assert len(seen) > 4  # it does sample, not just argmax
    top1 = sample_next_token(logits, rng, temperature=1.0, top_k=1)
    assert torch.equal(top1, logits.argmax(-1))


@pytest.mark.parametrize("stop_kind", ["assistant_end", "bos"])
def test_rows_stop_on_stop_tokens(model, stop_kind):
    free = Engine(model, FakeTokenizer(bos=62, assistant_end=63))
    ref, _ = free.generate_batch(PROMPTS[1], max_tokens=8, temperature=0.0)
    generated = ref[0][len(PROMPTS[1]) :]
    stop = generated[2]  # make the 3rd generated token a stop token
    assert stop not in generated[:2]
    tok = (
        FakeTokenizer(assistant_end=stop, bos=61) if stop_kind == "assistant_end" else FakeTokenizer(bos=stop)
    )
    engine = Engine(model, tok)
    columns = list(engine.generate(PROMPTS[1], max_tokens=8, temperature=0.0))
    assert len(columns) == 3 and columns[-1][0] == [stop]  # generation ended with the stop token
    results, _ = engine.generate_batch(PROMPTS[1], max_tokens=8, temperature=0.0)
    assert results[0] == PROMPTS[1] + generated[:2]  # stop token not included


def test_forced_tokens_hook(model):
    class ToolEngine(Engine):
        def on_token(self, row, token):
            if len(row.tokens) == len(PROMPTS[0]) + 1:  # after the first generated token: inject two
                row.forced_tokens.extend([50, 51])

    engine = ToolEngine(model, FakeTokenizer())
    results, masks = engine.generate_batch(PROMPTS[0], max_tokens=6, temperature=0.0)
    n = len(PROMPTS[0])
    assert results[0][n + 1 : n + 3] == [50, 51] and masks[0][n + 1 : n + 3] == [0, 0]
    assert masks[0][n] == 1 and masks[0][n + 3] == 1
    # the forced tokens were fed to the model: what follows is greedy given them
    assert results[0][n + 3] == int(full_logits(model, results[0][: n + 3]).argmax())


def test_reply_text_streams_tool_calls_as_fenced_blocks_and_parses_back():
    from nanochat.engine import ReplyText, reply_parts
    from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer

    tok = Tokenizer.train_from_iterator(["bytes only"], MIN_VOCAB_SIZE)
    s = tok.encode_special
    turn = [*tok.encode("Let me see: é"), s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
    turn += [
        s("<|output_start|>"),
        *tok.encode("42"),
        s("<|output_end|>"),
        *tok.encode("So 42."),
        s("<|bos|>"),
    ]
    shown = "Let me see: é\n```python\n6*7\n```\n```output\n42\n```\nSo 42."
    text, pieces = ReplyText(tok), []
    for token in turn:
        pieces.append(text.feed(token))
        assert "\ufffd" not in pieces[-1]  # the two bytes of "é" arrive as one piece
    assert "".join(pieces) + text.finish() == shown == ReplyText(tok).render(turn)
    assert sum(1 for p in pieces if p) > 5  # it streamed
    assert reply_parts(shown) == [
        {"type": "text", "text": "Let me see: é\n"},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "So 42."},
    ]
    assert reply_parts("plain ```python\nx\n``` without output") == "plain ```python\nx\n``` without output"
    cut = ReplyText(tok).render([s("<|python_start|>"), *tok.encode("1+")])  # max_tokens inside a call
    assert cut == "```python\n1+\n```\n"
