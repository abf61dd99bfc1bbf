"""MegaContext settings: the one place its defaults live.

Flags, docs and checkpoint meta all read these; `to_dict` goes into meta so a loader rebuilds GistNet and
LensNet without flags, and `from_dict` refuses keys it does not know instead of silently dropping them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from nanochat.common import UserError

CHOICES = {
    "gistnet_type": ("transformer", "mean"),
    "gistnet_pooling": ("mean", "query", "cls"),
    "gistnet_head": ("linear", "mlp"),
    "lensnet_head": ("linear", "mlp"),
    "lensnet_input": ("gist", "gist+mean", "gist+mean+match", "gist+mean+match+nb"),
    "allocator": ("greedy", "stochastic"),
    "tree_backend": ("ram", "disk"),
    "positions": ("wc_index", "global"),
    "score_norm": ("z", "raw"),
    "token_loss": ("mean", "marginal"),
}


@dataclass
class MCConfig:
    block_size: int = 32  # K: tokens per LOD1 gist and children per gist (32-ary tree)
    wc_budget: int = 512  # W_max: working-context budget (a raw block costs its tokens, a gist costs 1)
    # R: newest tokens that always stay raw. 2K = the still-filling block plus at least one complete block
    # behind it, so the text the next tokens lean on most is never gisted, and LensNet's query (the raw
    # tail) always holds >= K tokens of real text to judge old entries against.
    recent: int = 64
    max_level: int = 8  # highest gist level (32^8 tokens); sizes GistNet's level and LensNet's LOD embeddings
    # GPT positions of WC entries: "wc_index" = slot 0..L-1, sigma 0 (never beyond the trained range);
    # "global" = token positions with Gaussian RoPE (mu, sigma) for gists (see megacontext/training.py).
    positions: str = "wc_index"
    gistnet_type: str = "transformer"  # "mean" = no transformer, the cheap control
    gistnet_layers: int = 2
    gistnet_pooling: str = "query"  # starts exactly at the block mean (see gistnet.py), cls does not
    gistnet_head: str = "mlp"
    lensnet_layers: int = 2
    lensnet_head: str = "mlp"
    # What LensNet sees of an entry: its "gist" only, or "gist+mean": also the mean token embedding of its span,
    # so the lens can match the question's words against the entry's, or "gist+mean+match": also which query
    # tokens occur in its span, exactly (lensnet.py, lens_inputs.py), or "gist+mean+match+nb": also which occur
    # in its neighbours' spans (a key's block is found by the lock's name in the block next to it).
    lensnet_input: str = "gist"
    n_head: int = 4  # heads of GistNet and LensNet (head_dim = n_embd / n_head must be even for RoPE)
    allocator: str = "greedy"  # "stochastic" samples edits; used to draw training variants
    # Scores the allocator sees: "z" = the scorer's scores standardised over the WC's entries (tanh of the
    # z-score), so the thresholds are relative ("clearly above this WC's average") and LensNet and the
    # attention-mass scorer meet them on one scale; "raw" = the scores as emitted. LensNet's raw scores
    # stayed within ±0.05, under any useful threshold (docs/training.md).
    score_norm: str = "z"
    # Refocusing scores a gist of level >= 2 as the best of its descendants too (allocator.lookahead_scores),
    # so the allocator can zoom from LOD2 to the raw evidence over successive refocuses. Used by the mc-lens and
    # mc-attn evaluation views and by the chat session (MCSession.refocus, for gists up to LOD2).
    lookahead: bool = True
    tau_expand: float = 0.2  # expand only when score > tau_expand (hysteresis band around 0)
    tau_collapse: float = 0.2  # collapse only when score < -tau_collapse
    n_diff: int = 4  # at most this many edits per refocus
    cooldown: int = 2  # refocuses before a block may flip direction again
    tree_backend: str = "ram"
    variants: int = 4  # N: random working contexts per training sequence besides the baseline
    # Per row, the base working context zooms this many "copy hint" blocks to LOD1 and their expansions are
    # variants first (plans.copy_hints: blocks that hold an earlier occurrence of a horizon n-gram), so
    # the designed experiment often measures the evidence block instead of ~1 in 30. 0 = all random.
    copy_hints: int = 0
    # And this many "look-alike" blocks (plans.match_hints: the most distinct tokens shared with LensNet's
    # query, not copy hints), so a distractor's sentence gets measured too and the lens learns what opening
    # a look-alike costs, not only what the evidence pays. 0 = none.
    match_hints: int = 0
    # And this many of LensNet's own favourites (plans.plan_row: the base's gists it scores highest, not
    # copy hints): hard negatives, so a look-alike the lens would open gets its cost measured. 0 = none.
    lens_hints: int = 0
    horizon: int = 64  # H: shared recent tail where variants' losses are compared
    # How a row's working contexts train the GPT on the horizon: "mean" of their losses (DESIGN §4), or the
    # "marginal" -log mean_v p(horizon | WC_v), which credits the WCs that hold the evidence instead of
    # teaching every gisted one to answer from the prior (training.marginal_horizon_loss).
    token_loss: str = "mean"
    lens_weight: float = 0.1  # weight of the LensNet ranking loss in the total loss
    # Weight, inside the lens loss, of the listwise term (training.lens_top_loss): the best measured candidate
    # should outscore every editable entry of the WC, not only the other measured candidates. 0 = off.
    lens_listwise: float = 0.0
    gist_weight: float = 0.0  # weight of the optional gist-consistency loss (DESIGN §4.5); 0 = off
    # Weight of an extra next-token loss on the raw positions BEFORE the horizon, in every working context
    # (true labels, as in the horizon). The horizon loss alone gives the GPT ~H loss positions per working
    # context, far fewer than a vanilla step gives per row; this term lets every forward that already ran
    # teach language and reading gists. 0 = the horizon-only loss of DESIGN §4. See docs/training.md.
    lm_weight: float = 0.0
    # Weight of the plain vanilla loss over each whole raw row (one more GPT forward per row, no gists): the
    # GPT keeps what a vanilla model learns, in-context copying above all, which decayed under the
    # working-context losses alone (probe 0.86 -> 0.08 in 350 steps; docs/training.md). 0 = off.
    full_weight: float = 0.0
    # Highest gist level training makes and working contexts use (2 = LOD2, K² tokens). Levels above it are
    # hidden at evaluation (views.LevelCap): GistNet never learned to make them.
    wc_levels: int = 2
    # Training curriculum: the working-context budget starts at this fraction of the sequence length and
    # anneals to wc_budget over the first half of training (DESIGN §4.6). 0 = no curriculum.
    curriculum_start: float = 0.8

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"MegaContext {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        for name in (
            "block_size",
            "wc_budget",
            "max_level",
            "gistnet_layers",
            "lensnet_layers",
            "n_head",
            "n_diff",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"MegaContext {name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise UserError(f"MegaContext block_size must be >= 2, got {self.block_size}")
        if not 0 <= self.recent <= self.wc_budget:
            raise UserError(f"MegaContext recent={self.recent} must lie in [0, wc_budget={self.wc_budget}]")
        for name in (
            "cooldown",
            "variants",
            "copy_hints",
            "match_hints",
            "lens_hints",
            "horizon",
            "tau_expand",
            "tau_collapse",
            "lens_weight",
            "lens_listwise",
            "gist_weight",
            "lm_weight",
            "full_weight",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"MegaContext {name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MCConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown MegaContext config keys {unknown} (written by another version?); known: {sorted(known)}"
            )
        return cls(**d)


# ----------------------------------------------------------------------------- flags shared by every stage

# flag name -> MCConfig field. One table, so base/mid/SFT training and evaluation spell the flags alike and
# every default comes from MCConfig itself.
FLAGS = {
    "--mc-block-size": "block_size",
    "--mc-wc-budget": "wc_budget",
    "--mc-recent": "recent",
    "--mc-variants": "variants",
    "--mc-copy-hints": "copy_hints",
    "--mc-match-hints": "match_hints",
    "--mc-lens-hints": "lens_hints",
    "--mc-horizon": "horizon",
    "--mc-token-loss": "token_loss",
    "--mc-lens-weight": "lens_weight",
    "--mc-lens-listwise": "lens_listwise",
    "--mc-gist-weight": "gist_weight",
    "--mc-lm-weight": "lm_weight",
    "--mc-full-weight": "full_weight",
    "--mc-levels": "wc_levels",
    "--mc-positions": "positions",
    "--mc-score-norm": "score_norm",
    "--gistnet-type": "gistnet_type",
    "--gistnet-layers": "gistnet_layers",
    "--gistnet-pooling": "gistnet_pooling",
    "--gistnet-head": "gistnet_head",
    "--lensnet-layers": "lensnet_layers",
    "--lensnet-head": "lensnet_head",
    "--lensnet-input": "lensnet_input",
    "--allocator": "allocator",
    "--mc-curriculum-start": "curriculum_start",
}


def add_mc_args(parser) -> None:
    """Add `--mc` and the MegaContext flags (defaults from MCConfig) to an argparse parser."""
    g = parser.add_argument_group("MegaContext (DESIGN §4)")
    g.add_argument("--mc", action="store_true", help="train GistNet + LensNet with the GPT (MegaContext)")
    g.add_argument(
        "--mc-auto-batch",
        action="store_true",
        help="shrink the device batch so an MC step holds about as many positions as a vanilla one; "
        "gradient accumulation keeps the total batch equal",
    )
    defaults = MCConfig()
    for flag, name in FLAGS.items():
        default = getattr(defaults, name)
        kw = {"choices": CHOICES[name]} if name in CHOICES else {}
        g.add_argument(
            flag, type=type(default), default=default, help=f"MCConfig.{name} (default {default})", **kw
        )


def mc_config_from_args(args) -> MCConfig | None:
    """MCConfig from parsed flags, or None without --mc."""
    if not getattr(args, "mc", False):
        return None
    return MCConfig(**{name: getattr(args, flag[2:].replace("-", "_")) for flag, name in FLAGS.items()})


def build_nets(cfg: MCConfig, d_model: int):
    """GistNet and LensNet at the GPT's width, as the config says (imports here: config stays torch-free)."""
    from megacontext.gistnet import GistNet
    from megacontext.lensnet import LensNet

    if d_model % cfg.n_head or (d_model // cfg.n_head) % 2:
        raise UserError(f"model width {d_model} needs an even head size for MegaContext n_head={cfg.n_head}")
    gistnet = GistNet(
        d_model,
        cfg.n_head,
        cfg.gistnet_layers,
        cfg.block_size,
        cfg.gistnet_type,
        cfg.gistnet_pooling,
        cfg.gistnet_head,
        cfg.max_level,
    )
    lensnet = LensNet(
        d_model,
        cfg.n_head,
        cfg.lensnet_layers,
        cfg.lensnet_head,
        cfg.max_level,
        lexical=cfg.lensnet_input != "gist",
        match="+match" in cfg.lensnet_input,
        neighbours=cfg.lensnet_input.endswith("+nb"),
    )
    return gistnet, lensnet
