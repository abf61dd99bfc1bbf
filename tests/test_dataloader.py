"""DataLoader: BOS per document, shift by one, disjoint ranks, exact resume, val is one pass."""

import json
import random
import re

import pytest
import torch

from nanochat import dataset
from nanochat.common import UserError
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta river stone cloud paper ember frost lumen quartz".split()
B, T = 2, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 shards (3 train + val) of 4 row groups x 3 documents, each document tagged `doc-<s>-<i>:`."""
    data_dir = tmp_path_factory.mktemp("base_data")
    rng = random.Random(0)
    docs = []
    for s in range(4):
        shard = [f"doc-{s}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for i in range(12)]
        dataset.write_shard(data_dir / dataset.shard_name(s), shard, row_group_docs=3)
        docs += shard
    tok = Tokenizer.train_from_iterator(docs * 3, vocab_size=400)
    return data_dir, tok


def loader(corpus, split="train", rank=0, world_size=1, state=None, b=B, t=T):
    data_dir, tok = corpus
    return DataLoader(tok, b, t, split, "cpu", rank, world_size, state=state, data_dir=data_dir)


def expected_stream(corpus, split, rank, world_size, epochs):
    """What the loader must produce, built independently: BOS + tokens of each of this rank's documents."""
    data_dir, tok = corpus
    out = []
    for _ in range(epochs):
        for texts in dataset.parquets_iter_batched(split, rank, world_size, data_dir):
            for text in texts:
                out += [tok.get_bos_token_id()] + tok.encode(text)
    return torch.tensor(out)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_batches_are_the_packed_document_stream(corpus, rank, world_size):
    stream = expected_stream(corpus, "train", rank, world_size, epochs=3)
    n = (len(stream) - 1) // (B * T)  # crosses two epoch boundaries
    dl = loader(corpus, rank=rank, world_size=world_size)
    for k in range(n):
        x, y = next(dl)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x.flatten(), stream[k * B * T : (k + 1) * B * T])
        assert torch.equal(y.flatten(), stream[k * B * T + 1 : (k + 1) * B * T + 1])  # shifted by one
        assert torch.equal(x[:, 1:], y[:, :-1])
    bos = corpus[1].get_bos_token_id()
    # One BOS per document, and each BOS is followed by the document tag.
    text = corpus[1].decode(stream.tolist())
    assert (stream == bos).sum().item() == len(re.findall(r"doc-\d+-\d+:", text))


def test_two_ranks_see_disjoint_data(corpus):
    _, tok = corpus
    seen = []
    for rank in (0, 1):
        dl = loader(corpus, rank=rank, world_size=2)
        ids = torch.cat([next(dl)[0].flatten() for _ in range(12)]).tolist()
        seen.append(set(re.findall(r"doc-\d+-\d+", tok.decode(ids))))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert all(int(d.split("-")[1]) < 3 for d in seen[0] | seen[1])  # never the val shard
    # Row groups r, r+2, ... of the split (4 per shard): documents 0-2 and 6-8 of each shard go to rank 0,
    # 3-5 and 9-11 to rank 1.
    assert all((int(d.split("-")[2]) // 3) % 2 == 0 for d in seen[0])
    assert all((int(d.split("-")[2]) // 3) % 2 == 1 for d in seen[1])


@pytest.mark.parametrize("k", [0, 1, 2, 5, 13, 40])
def test_resume_yields_exactly_the_uninterrupted_batches(corpus, k):
    reference = loader(corpus, rank=1, world_size=2)
    want = [next(reference) for _ in range(k + 8)][k:]
    dl = loader(corpus, rank=1, world_size=2)
    for _ in range(k):
        next(dl)
    state = json.loads(json.dumps(dl.state_dict()))  # JSON-able, and small
    assert len(json.dumps(state)) < 200
    resumed = loader(corpus, rank=1, world_size=2, state=state)
    for a, b in zip(want, [next(resumed) for _ in range(8)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Taking a state does not disturb the loader it was taken from.
    for a, b in zip(want, [next(dl) for _ in range(8)]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_val_is_one_pass(corpus):
    stream = expected_stream(corpus, "val", 0, 1, epochs=1)
    batches = list(loader(corpus, split="val"))
    assert len(batches) == (len(stream) - 1) // (B * T) > 0
    assert torch.equal(torch.cat([x.flatten() for x, _ in batches]), stream[: len(batches) * B * T])
    with pytest.raises(UserError, match="fewer than B\\*T\\+1"):
        next(loader(corpus, split="val", b=64, t=512))


def test_bad_states_and_empty_ranks(corpus):
    state = loader(corpus, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="world_size"):
        loader(corpus, rank=0, world_size=4, state=state)
    with pytest.raises(UserError, match="split"):
        loader(corpus, split="val", rank=0, world_size=2, state=state)
    with pytest.raises(UserError, match="gets no row groups"):
        next(loader(corpus, rank=12, world_size=13))  # only 12 row groups in the train split
    with pytest.raises(UserError, match="outside world size"):
        loader(corpus, rank=2, world_size=2)
