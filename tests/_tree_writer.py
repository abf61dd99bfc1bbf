"""Deterministic tree writer for the kill test (tests/test_tree.py), also the source of its fake GistNet.

Run as a subprocess: continues the disk tree at PATH from wherever it stands, ingesting the deterministic
token stream in batches of varying size (so commits fall mid-block), and prints `ack <num_tokens>` after
every batch whose tokens and gists were committed. The test SIGKILLs it at random points.
"""

import argparse

import numpy as np
import torch

from megacontext.tree import MegaContextTree

K, D, VOCAB = 32, 16, 50257


def token_stream(start: int, end: int) -> np.ndarray:
    """Token at position p: a fixed hash of p, so any span can be regenerated for comparison."""
    p = np.arange(start, end, dtype=np.int64)
    return (p * 2654435761 + 12345) % VOCAB


def fake_embed(ids: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B, K, D]: small integers that depend on the id and the channel."""
    return ((ids.unsqueeze(-1) * torch.arange(1, D + 1)) % 97).float()


def fake_gist(x: torch.Tensor, level: int) -> torch.Tensor:
    """Mean over the block plus the level, so a gist made at the wrong level or from the wrong children shows."""
    return x.mean(dim=1) + level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--total", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    tree = MegaContextTree.open(args.path, K=K, d=D, model_id="fake-mean", dtype="fp16")
    print(f"start {tree.num_tokens}", flush=True)
    while tree.num_tokens < args.total:
        n = min(int(rng.integers(1, 4000)), args.total - tree.num_tokens)
        tree.append(token_stream(tree.num_tokens, tree.num_tokens + n))
        tree.gist_pending(fake_embed, fake_gist, batch_size=64)
        tree.flush()
        print(f"ack {tree.num_tokens}", flush=True)
    tree.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
