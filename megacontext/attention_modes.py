"""Attention modes of base training: `--attention dense | window | mega`.

dense  - the vanilla GPT. base_train calls the model exactly as before; nothing here runs.
window - sliding-window causal attention: each token sees the W tokens before it and itself
         (mega_attention.sliding_window_layout). The same cost as mega at equal W, but no view of the past
         beyond W: the baseline MegaAttention has to beat on long-context tasks.
mega   - MegaAttention (docs/design.md §6): GistNet summary nodes packed after the raw positions, Gaussian RoPE at
         their spans, the pyramidal mask, and the zoom (megacontext/zoom.py): each raw query also reads the raw
         tokens of its top-k chunks beyond the window, ranked by their keys' bounds, in its one softmax
         (`--mega-zoom-k`, 0 = the pyramid alone); optionally MegaPrediction (megacontext/prediction.py) on the nodes.

`AttentionModel` wraps the GPT from outside (STYLE: the GPT stays a GPT). Its forward has the GPT's
signature for token ids, so evaluate_bpb, base_loss and the `full` view of mc_eval score a checkpoint
under its own attention mode unchanged. A call with embeddings, rotary phases, a mask or a KV cache (the
MegaContext views, Engine sampling) goes to the plain GPT: for a short prompt (at most W + K tokens) that
is the mode's own attention, since no node is complete yet and the window still reaches back to 0.

The defaults are the measured recipe (docs/mega_attention.md): W and K from the training length
(megacontext.config.scale: W 32, K 16 at T 256), MegaPrediction off (it held the node-reading circuit back).

window and the pyramid alone pass the dense boolean [T, T] mask (mega_attention's SDPA reference, cached per
length); the zoom passes the GPT an attention function (zoom.ZoomAttention: the dense reference on CPU up to
2k packed positions, block-sparse beyond, flex_attention on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.config import REFERENCE, scale
from megacontext.gistnet import GistNet
from megacontext.mega_attention import (
    _cached_mask,
    auto_levels,
    build_mega_layout,
    build_nodes,
    mega_rotary,
    sliding_window_layout,
)
from megacontext.prediction import MegaPrediction, ramp
from megacontext.zoom import ZoomAttention, training_reach
from nanochat.common import UserError, print0

MODES = ("dense", "window", "mega")
ZOOM_K = 4  # chunks each raw query reads raw beyond its window (docs/mega_attention.md, "The zoom")
# Settings that measurements removed (docs/log.md), with the one value the code now implements: a checkpoint's
# meta may still name them; it loads when it used that value and is refused with a clear line otherwise.
REMOVED = {"sink": False}  # raw position 0 visible to every query: a null result (docs/mega_attention.md)


@dataclass
class AttentionConfig:
    """The one place the attention-mode defaults live; `to_dict` goes into checkpoint meta["attention"].
    W and K follow the training length (`for_seq_len`); the dataclass defaults are those of base_train's
    default length."""

    mode: str = "dense"
    window: int = REFERENCE.window  # W: raw tokens each query sees back from itself (window and mega)
    block_size: int = (
        REFERENCE.block_size
    )  # K: raw positions per wLOD1 node = per zoom chunk (docs/design.md §2)
    # Node levels, derived from the training length (auto_levels). Evaluation on longer sequences never
    # builds more: GistNet's level embedding for a higher level was never trained.
    levels: int = 0
    gistnet_layers: int = 2  # the MegaContext GistNet defaults (megacontext/config.py)
    gistnet_heads: int = 4
    # MegaPrediction weights, first -> last step; (0, 0) = off, the default: with it on the node-reading circuit
    # formed later or not at all (docs/mega_attention.md)
    mp_alpha1: tuple[float, float] = (0.0, 0.0)  # LOD1
    mp_alpha2: tuple[float, float] = (0.0, 0.0)  # LOD2
    # mega: top-k chunks each raw query zooms into (megacontext/zoom.py); 0 = the pyramid alone. Meta written
    # before the zoom existed has no key and loads as 0, as it was trained (from_dict).
    zoom_k: int = ZOOM_K
    # how the zoom's reads see positions: the chunk frame (megacontext/zoom.py), the one kept. Meta of a zoom
    # model from before has no key: its reads were at the tokens' real positions, and from_dict refuses it.
    zoom_frame: str = "chunk"

    @classmethod
    def for_seq_len(cls, seq_len: int, **fields_) -> AttentionConfig:
        """The recipe at a training length: W and K from megacontext.config.scale, the rest the defaults."""
        s = scale(seq_len)
        return cls(**{"window": s.window, "block_size": s.block_size, **fields_})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> AttentionConfig:
        """None (a checkpoint from before attention modes) is dense. A removed setting loads only at the value
        the code still implements (REMOVED); a missing `zoom_k` (meta from before the zoom) is 0, and a zoom
        with no `zoom_frame` read at real positions, which is refused."""
        d = dict(d or {})
        for key, kept in REMOVED.items():
            if key in d and (value := d.pop(key)) != kept:
                raise UserError(
                    f"this checkpoint was trained with attention {key}={value!r}, a setting this version removed "
                    f"(only {kept!r} remains, docs/log.md); retrain it or use an older version"
                )
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise UserError(f"unknown attention config keys {unknown} (written by another version?)")
        d.setdefault("zoom_k", 0)
        frame = d.setdefault("zoom_frame", "real" if d["zoom_k"] else "chunk")
        if frame != "chunk":
            raise UserError(
                f"this checkpoint's zoom reads its chunks in the {frame!r} frame, which this version removed (only "
                "the chunk frame remains, docs/log.md); retrain it or use an older version"
            )
        for key in ("mp_alpha1", "mp_alpha2"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @property
    def prediction(self) -> bool:
        return self.mode == "mega" and max(*self.mp_alpha1, *self.mp_alpha2) > 0


# ----------------------------------------------------------------------------- flags


def add_attention_args(parser) -> None:
    d = AttentionConfig()
    g = parser.add_argument_group("attention (docs/design.md §6, docs/mega_attention.md)")
    g.add_argument("--attention", choices=MODES, default=d.mode, help="dense | window | mega (default dense)")
    g.add_argument(
        "--mega-window", type=int, default=None, help="W of window and mega (default max-seq-len / 8, >= K)"
    )
    g.add_argument(
        "--mega-block-size",
        type=int,
        default=None,
        help="K of --attention mega: tokens per node and per zoom chunk (default max-seq-len / 32 in [16, 32])",
    )
    g.add_argument(
        "--mega-zoom-k",
        type=int,
        default=None,
        help=f"--attention mega: chunks each query reads raw beyond its window, ranked by their keys' bounds "
        f"(default {d.zoom_k}; 0 = the pyramid alone)",
    )
    for lv, alpha in ((1, d.mp_alpha1), (2, d.mp_alpha2)):
        g.add_argument(
            f"--mp-alpha{lv}",
            type=str,
            default=None,
            help=f"MegaPrediction LOD{lv} loss weight START[,END], linear over training "
            f"(default {alpha[0]:g}: off; e.g. 0.02,0.05)",
        )


def parse_alpha(flag: str, text: str) -> tuple[float, float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 0 or not all(map(math.isfinite, values)):
        raise UserError(f"{flag} takes START[,END], two weights >= 0 such as 0.02,0.05; got {text!r}")
    return values[0], values[-1]


def attention_config_from_args(args, seq_len: int) -> AttentionConfig:
    """Validated AttentionConfig from base_train's flags at the training length; a bad combination is a
    UserError."""
    mode = args.attention
    given = {
        "--mega-window": args.mega_window is not None,
        "--mega-block-size": args.mega_block_size is not None,
        "--mega-zoom-k": args.mega_zoom_k is not None,
        "--mp-alpha1": args.mp_alpha1 is not None,
        "--mp-alpha2": args.mp_alpha2 is not None,
    }
    allowed = {"dense": (), "window": ("--mega-window",), "mega": tuple(given)}[mode]
    if bad := [flag for flag, on in given.items() if on and flag not in allowed]:
        raise UserError(f"{bad[0]} does not apply to --attention {mode}")
    if mode != "dense" and getattr(args, "mc", False):
        raise UserError(
            f"--attention {mode} cannot be combined with --mc: MegaContext training runs the GPT on its own "
            "working contexts; train one or the other"
        )
    d = AttentionConfig.for_seq_len(seq_len)
    cfg = AttentionConfig(mode=mode, zoom_k=0)
    if mode == "dense":
        return cfg
    cfg.window = d.window if args.mega_window is None else args.mega_window
    if cfg.window < 1:
        raise UserError(f"--mega-window must be >= 1, got {cfg.window}")
    if mode == "mega":
        cfg.block_size = d.block_size if args.mega_block_size is None else args.mega_block_size
        if cfg.block_size < 2:
            raise UserError(f"--mega-block-size must be >= 2, got {cfg.block_size}")
        cfg.zoom_k = d.zoom_k if args.mega_zoom_k is None else args.mega_zoom_k
        if cfg.zoom_k < 0:
            raise UserError(f"--mega-zoom-k must be >= 0, got {cfg.zoom_k}")
        cfg.mp_alpha1 = d.mp_alpha1 if args.mp_alpha1 is None else parse_alpha("--mp-alpha1", args.mp_alpha1)
        cfg.mp_alpha2 = d.mp_alpha2 if args.mp_alpha2 is None else parse_alpha("--mp-alpha2", args.mp_alpha2)
        cfg.levels = auto_levels(seq_len, cfg.block_size, cfg.window)
        if cfg.levels == 0:
            print0(f"note: at --max-seq-len {seq_len} no node level exists (W + K >= T): mega equals dense")
    elif cfg.window >= seq_len - 1:
        print0(f"note: --mega-window {cfg.window} covers --max-seq-len {seq_len}: window equals dense")
    return cfg


# ----------------------------------------------------------------------------- the model


class AttentionModel(nn.Module):
    """The GPT under a window or mega attention mode, plus the mode's own nets (GistNet, MegaPrediction)."""

    full_context = True  # a chat recomputes the whole sequence per token (nanochat.engine.chat_engine)

    def __init__(self, gpt: nn.Module, cfg: AttentionConfig):
        super().__init__()
        if cfg.mode not in ("window", "mega"):
            raise ValueError(f"AttentionModel runs window or mega attention, not {cfg.mode!r}")
        self.gpt, self.cfg = gpt, cfg
        self.gistnet = self.predictor = None
        d = gpt.config.n_embd
        if cfg.mode == "mega":
            if d % cfg.gistnet_heads or (d // cfg.gistnet_heads) % 2:
                raise UserError(
                    f"model width {d} needs an even head size for GistNet's {cfg.gistnet_heads} heads"
                )
            max_level = max(cfg.levels, 1)
            self.gistnet = GistNet(
                d, cfg.gistnet_heads, cfg.gistnet_layers, cfg.block_size, max_level=max_level
            )
            if cfg.prediction:
                self.predictor = MegaPrediction(d)
            self.to(gpt.wte.weight.device)

    @property
    def rotary_len(self) -> int:
        """The longest sequence the mode runs: mega computes each position's (Gaussian) RoPE from its span, so
        any length; window reads the GPT's rotary table."""
        return 1 << 62 if self.cfg.mode == "mega" else self.gpt.rotary_len

    def __getattr__(self, name):
        """Everything else (config, wte, lm_head, rotary_len, ...) is the GPT's, so callers that read the
        GPT's attributes (views, Engine, evaluate_bpb) take this model as they take the GPT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("gpt"), name)

    # ---- the nets that train and save alongside the GPT
    def aux_modules(self) -> list[nn.Module]:
        return [m for m in (self.gistnet, self.predictor) if m is not None]

    def aux_state(self) -> dict:
        """State dicts for the checkpoint's model file, next to the GPT (save_checkpoint's mc_state)."""
        names = {"mega_gistnet": self.gistnet, "mega_prediction": self.predictor}
        return {k: m.state_dict() for k, m in names.items() if m is not None}

    def load_aux_state(self, state: dict) -> None:
        for key, module in (("mega_gistnet", self.gistnet), ("mega_prediction", self.predictor)):
            if module is None:
                continue
            if key not in state:
                raise UserError(f"checkpoint lacks the {key} weights its attention config needs")
            module.load_state_dict(state[key])  # strict

    # ---- forward
    def layout(self, N: int):
        """Layout for N raw positions, or None when the mode's mask is plain causal (then the GPT runs as is)."""
        cfg = self.cfg
        if cfg.mode == "window":
            return sliding_window_layout(N, cfg.window) if N - 1 > cfg.window else None
        levels = min(auto_levels(N, cfg.block_size, cfg.window), cfg.levels)
        return build_mega_layout(N, cfg.block_size, cfg.window, levels) if levels else None

    def zoom(self, lay, device) -> ZoomAttention | None:
        """The zoom's attention function for a layout (None: the pyramid alone). Its pyramid reads a pair
        farther apart than the training rows ever held at that distance (`training_reach`): beyond the
        training length the far nodes' logits stay where training put them (docs/mega_attention.md)."""
        if not self.cfg.zoom_k:
            return None
        reach = training_reach(self.gpt.config.sequence_len, self.cfg.block_size)
        return ZoomAttention(lay, self.cfg.zoom_k, device, reach=reach)

    def run(self, idx, targets=None, loss_reduction="mean", nodes=None, capture=False):
        """(loss or raw logits, layout, node embeddings, final hidden states) for token ids [B, N].

        The loss covers raw positions only (nodes get target -1). `nodes` replaces GistNet's nodes (ΔNLL of
        MegaPrediction); `capture` also returns the GPT's final hidden states [B, T, d] (the LM head's input).
        """
        B, N = idx.shape
        lay = self.layout(N)
        if lay is None:
            return self.gpt(idx, targets, loss_reduction=loss_reduction), None, None, None
        mask = _cached_mask(lay, str(idx.device))[None, None]
        if self.cfg.mode == "window":
            return self.gpt(idx, targets, attn_mask=mask, loss_reduction=loss_reduction), lay, None, None
        embeds = self.gpt.wte(idx)
        if nodes is None:
            nodes = build_nodes(embeds, lay, self.gistnet)
        packed = torch.cat([embeds, nodes.to(embeds.dtype)], dim=1)
        full = None if targets is None else torch.cat([targets, targets.new_full((B, lay.T - N), -1)], dim=1)
        captured = {}
        # the zoom is an attention function (megacontext/zoom.py); the pyramid alone a mask for SDPA
        zoom = self.zoom(lay, idx.device)
        hook = self.gpt.lm_head.register_forward_hook(lambda m, inp, out: captured.update(h=inp[0]))
        try:
            out = self.gpt(
                embeds=packed,
                targets=full,
                rotary=mega_rotary(lay, self.gpt.config.head_dim, idx.device),
                attn_mask=None if zoom else mask,
                loss_reduction=loss_reduction,
                shift_len=N,  # GPTConfig.smear shifts the raw tokens only, never into a node
                attn_fn=zoom,
            )
        finally:
            hook.remove()
        if targets is None:
            out = out[:, :N]
        elif loss_reduction == "none":  # flat [B * N] like the vanilla forward: drop the node slots
            out = out.view(B, lay.T)[:, :N].reshape(-1)
        return out, lay, nodes, captured.get("h") if capture else None

    def forward(self, idx=None, targets=None, embeds=None, rotary=None, kv_cache=None, attn_mask=None,
                loss_reduction="mean"):  # fmt: skip
        """The GPT's signature. Token ids alone run the attention mode; anything else runs the plain GPT."""
        if (
            idx is None
            or embeds is not None
            or rotary is not None
            or kv_cache is not None
            or attn_mask is not None
        ):
            return self.gpt(idx, targets, embeds, rotary, kv_cache, attn_mask, loss_reduction)
        return self.run(idx, targets, loss_reduction)[0]

    # ---- training
    def train_loss(self, x, y, progress: float):
        """(next-token loss, auxiliary loss or None, metrics) for one micro-batch. The auxiliary term is
        MegaPrediction's weighted 1 - cos; it trains with the LM loss but stays out of the logged loss, so
        losses compare across modes."""
        loss, lay, nodes, hidden = self.run(x, y, capture=self.predictor is not None)
        if nodes is None:  # window, or no node level at this length
            return loss, None, {}
        metrics = {}
        if lay.counts[1] >= 2:
            metrics["mp/node_cos"] = node_cos(nodes[:, : lay.counts[1]])
        if self.predictor is None:
            return loss, None, metrics
        aux = None
        alphas = {1: self.cfg.mp_alpha1, 2: self.cfg.mp_alpha2}
        for lv, cos in self.predictor.cosines(hidden, nodes, lay).items():
            term = ramp(alphas[lv], progress) * (1 - cos).mean()
            aux = term if aux is None else aux + term
            metrics[f"mp/lod{lv}_cos"] = float(cos.detach().mean())
            # the trivial predictor for comparison: "the next gist is like the current one"
            a, n = lay.offsets[lv] - lay.N, lay.counts[lv]
            prev = F.cosine_similarity(
                nodes[:, a : a + n - 1].float(), nodes[:, a + 1 : a + n].float(), dim=-1
            )
            metrics[f"mp/lod{lv}_cos_prev"] = float(prev.detach().mean())
        if aux is not None:
            metrics["mp/loss"] = float(aux.detach())
        return loss, aux, metrics

    @torch.no_grad()
    def mp_delta_nll(self, x, y) -> dict:
        """ΔNLL per level: mean next-token NLL when nodes 1.. of the level are replaced by their predictions
        minus with the true nodes, over the raw positions whose mask reads a replaced node (nats). Near 0:
        the prediction stands in for the true gist; large: the GPT uses what the prediction lacks."""
        if self.predictor is None:
            return {}
        B, N = x.shape
        base, lay, nodes, hidden = self.run(x, y, "none", capture=True)
        if lay is None:
            return {}
        base = base.view(B, N)
        mask = _cached_mask(lay, str(x.device))
        out = {}
        for lv in self.predictor.levels(lay):
            swapped = self.predictor.swap_in(hidden, nodes, lay, lv)
            loss = self.run(x, y, "none", nodes=swapped)[0].view(B, N)
            off, n = lay.offsets[lv], lay.counts[lv]
            sel = (y >= 0) & mask[:N, off + 1 : off + n].any(dim=1)[None]
            if bool(sel.any()):
                out[f"mp/lod{lv}_dnll"] = float((loss - base)[sel].mean())
        return out

    def flops_per_token(self, N: int) -> float:
        """Training FLOPs per raw token of a length-N sequence, counting what runs: the GPT's matmuls over
        every packed position (raw + nodes) and attention as the dense masked kernel computes it (all T keys
        per query, nanochat's 12·layers·heads·head_dim·T), GistNet over every node input, the MP heads, and the
        zoom's chunk bounds (each raw query against the least and the greatest keys of every complete chunk: two
        matmuls, forward only; the selected chunks' keys are in the dense kernel's count already)."""
        lay = self.layout(N)
        T = N if lay is None else lay.T
        c = self.gpt.config
        n_matmul = sum(p.numel() for p in self.gpt.parameters()) - self.gpt.wte.weight.numel()
        flops = (6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * T) * T
        if self.cfg.zoom_k and lay is not None:
            flops += 2 * 2 * c.n_layer * c.n_head * c.head_dim * N * lay.counts[1]
        if self.gistnet is not None and lay is not None:
            node_inputs = sum(lay.counts[lv] * lay.K for lv in range(1, lay.levels + 1))
            flops += 6 * sum(p.numel() for p in self.gistnet.parameters()) * node_inputs
        if self.predictor is not None:
            flops += 6 * sum(p.numel() for p in self.predictor.parameters()) * (T - N)
        return flops / N


@torch.no_grad()
def node_cos(nodes: torch.Tensor, max_nodes: int = 256) -> float:
    """Mean cosine between two distinct wLOD1 nodes of the same row, over all pairs (the expectation over
    random pairs, without drawing random numbers in training), nodes [B, n, d] with n >= 2. Near 1: the gists
    collapsed to one direction (measured 0.92-0.99 with plain-text training); a long row uses max_nodes evenly spaced nodes."""
    n = nodes.size(1)
    if n > max_nodes:
        nodes = nodes[:, torch.linspace(0, n - 1, max_nodes, device=nodes.device).long()]
        n = max_nodes
    u = F.normalize(nodes.float(), dim=-1)
    gram = u @ u.transpose(1, 2)  # [B, n, n]
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)
    return float((off_diagonal / (n * (n - 1))).mean())


def attention_model(gpt, ckpt_dir, step: int, meta: dict, device):
    """The GPT under the attention mode its checkpoint records (the GPT itself for dense), nets loaded."""
    cfg = AttentionConfig.from_dict(meta.get("attention"))
    if cfg.mode == "dense":
        return gpt
    from nanochat.checkpoint_manager import load_mc_state

    model = AttentionModel(gpt, cfg)
    if model.aux_modules():
        model.load_aux_state(load_mc_state(ckpt_dir, step, device))
    model.train(gpt.training)
    print0(f"attention: {describe(cfg)}")
    return model


def describe(cfg: AttentionConfig) -> str:
    """One line for logs: the mode and its geometry."""
    if cfg.mode == "window":
        return f"window W={cfg.window}"
    if cfg.mode == "mega":
        mp = f"mp α1 {cfg.mp_alpha1} α2 {cfg.mp_alpha2}" if cfg.prediction else "mp off"
        zoom = f"zoom top-{cfg.zoom_k}" if cfg.zoom_k else "pyramid only"
        return f"mega W={cfg.window} K={cfg.block_size} levels={cfg.levels} {zoom} {mp}"
    return "dense"
