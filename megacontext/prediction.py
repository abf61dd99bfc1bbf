"""MegaPrediction: the newest node of each level predicts the future at its own scale (docs/design.md §6).

Under MegaAttention (megacontext/mega_attention.py) the wLODl node j becomes visible once its last raw child
has arrived; at that moment it is the newest node of its level, and its row of the mask is its last child's,
so its hidden state has seen exactly the past up to the end of its span. MegaPrediction asks that state for
the future at the node's own scale: LOD0 is the next token (the LM head, already trained), LOD1 the gist of
the next K true tokens and LOD2 of the next K² true tokens, which are exactly nodes j + 1 of levels 1 and 2.

* The predictor reads the GPT's final hidden state at the node's slot (the input of the LM head). Nodes carry
  no next-token loss, so without MegaPrediction that state feeds nothing; with it the nodes learn to look
  ahead, and the gradient reaches every layer through them.
* A small head per level maps it to a gist. The LM head is untied and outputs logits, so it cannot emit one.
  The head is GistNet's residual MLP head (zero output projection: at init the prediction is the node's own
  state), followed by RMSNorm so a predicted gist sits at the scale of a real one (GistNet's output is
  unit-RMS) and can stand in for it.
* The target is GistNet of the true future under no_grad: node j + 1 detached, the same value without a
  second GistNet pass. The loss is 1 - cos, with a weight that ramps linearly over training
  (α1 0.02 → 0.05, α2 0.01 → 0.03; megacontext.attention_modes holds the defaults and flags).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.gistnet import Head
from megacontext.mega_attention import MegaLayout
from nanochat.gpt import norm

LEVELS = (
    2  # LOD1 and LOD2 heads (docs/design.md §6); higher levels, where a layout has them, are not predicted
)


class MegaPrediction(nn.Module):
    def __init__(self, d_model: int, levels: int = LEVELS):
        super().__init__()
        self.heads = nn.ModuleList([Head(d_model, "mlp") for _ in range(levels)])
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for head in self.heads:
            head.init_weights()

    def forward(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Predicted gist [..., d] of the next K**level tokens from node hidden states [..., d]."""
        return norm(self.heads[level - 1](hidden))

    def levels(self, lay: MegaLayout) -> list[int]:
        """Levels of `lay` with a head and at least one (node, next node) pair."""
        return [lv for lv in range(1, min(lay.levels, len(self.heads)) + 1) if lay.counts[lv] >= 2]

    def cosines(self, hidden: torch.Tensor, nodes: torch.Tensor, lay: MegaLayout) -> dict[int, torch.Tensor]:
        """Per level: cos [B, n - 1] between the prediction of node j and the true node j + 1.

        hidden: the GPT's final hidden states [B, T, d] (packed order); nodes: the node embeddings GistNet
        made [B, T - N, d] (the targets, detached here).
        """
        out = {}
        for lv in self.levels(lay):
            off, n = lay.offsets[lv], lay.counts[lv]
            pred = self(hidden[:, off : off + n - 1], lv)
            target = nodes[:, off - lay.N + 1 : off - lay.N + n].detach()
            out[lv] = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        return out

    def swap_in(self, hidden: torch.Tensor, nodes: torch.Tensor, lay: MegaLayout, level: int) -> torch.Tensor:
        """`nodes` with nodes 1.. of `level` replaced by their predictions (from nodes 0..), for ΔNLL.

        Higher levels keep the gists of the true children: the swap isolates what this level's prediction
        carries.
        """
        off, n = lay.offsets[level], lay.counts[level]
        out = nodes.clone()
        out[:, off - lay.N + 1 : off - lay.N + n] = self(hidden[:, off : off + n - 1], level).to(nodes.dtype)
        return out


def ramp(alpha: tuple[float, float], progress: float) -> float:
    """Linear from alpha[0] at the first step to alpha[1] at the last (progress in [0, 1])."""
    return alpha[0] + (alpha[1] - alpha[0]) * min(max(progress, 0.0), 1.0)
