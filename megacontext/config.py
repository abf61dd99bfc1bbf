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
}

# Settings that measurements removed (docs/log.md), with the one value the code now implements. A checkpoint's
# config may still name them: it loads when it used that value, and is refused with a clear line otherwise.
REMOVED = {
    "positions": "wc_index",  # "global" positions: never run end to end; they show the GPT unseen positions
    "score_norm": "z",  # LensNet's "raw" scores never passed a threshold
    "tree_backend": "ram",  # never read: the session picks the tree's storage
    "match_hints": 0,  # look-alike hints measured worse
    "token_loss": "marginal",  # the mean horizon loss taught the GPT to answer from its prior
    "gist_weight": 0.0,  # the gist-consistency loss: off in every recorded run (docs/log.md)
}


@dataclass(frozen=True)
class Scale:
    """The recipe's values that depend on the training length: one function derives them all (`scale`)."""

    block_size: int  # K of MegaContext and of MegaAttention's nodes
    wc_budget: int  # W_max of the working context
    recent: int  # raw tokens always kept at the end of a working context
    horizon: int  # H: the shared tail where working contexts are compared
    window: int  # W of --attention window / mega


def scale(seq_len: int) -> Scale:
    """The measured recipe at seq_len, as a rule of the training length (depth does not enter: the memory's
    geometry is about the sequence, and d4 to d20 ran the same rule).

    Measured at T = 512 (runcpu, docs/status.md): K 16, budget 128 (T/4), recent 32 (budget/4), horizon 8 (K/2);
    MegaAttention at T = 256: W 32 (T/8), K 16. Longer rows keep the ratios with K growing to the design's 32
    (K = budget/8, clamped to [16, 32]).
    """
    budget = max(16, seq_len // 4)
    K = min(32, max(16, budget // 8))
    K = min(K, max(2, budget // 2))  # tiny test rows: at least two blocks fit the budget
    return Scale(
        block_size=K,
        wc_budget=budget,
        recent=max(K, budget // 4),
        horizon=max(1, K // 2),
        window=max(K, seq_len // 8),
    )


REFERENCE = scale(2048)  # the dataclass defaults: base_train's default length


@dataclass
class MCConfig:
    """MegaContext's settings. The defaults are the best measured recipe; base_train builds it for its length
    with `MCConfig.for_seq_len` (the scale-dependent fields from `scale`)."""

    block_size: int = REFERENCE.block_size  # K: tokens per LOD1 gist and children per gist
    wc_budget: int = (
        REFERENCE.wc_budget
    )  # W_max: working-context budget (a raw block costs its tokens, a gist 1)
    # R: newest tokens that always stay raw: the text the next tokens lean on most is never gisted, and
    # LensNet's query (the raw tail) always holds >= K tokens of real text. A quarter of the budget, so three
    # quarters are room for old history (measured better than recent 64 of 128, docs/log.md).
    recent: int = REFERENCE.recent
    max_level: int = 8  # highest gist level (K^8 tokens); sizes GistNet's level and LensNet's LOD embeddings
    gistnet_type: str = "transformer"  # "mean" = no transformer, the cheap control
    gistnet_layers: int = 2
    gistnet_pooling: str = "query"  # starts exactly at the block mean (see gistnet.py), cls does not
    gistnet_head: str = "mlp"
    lensnet_layers: int = 2
    lensnet_head: str = "mlp"
    # What LensNet sees of an entry: its "gist", "+mean" the mean token embedding of its span, "+match" which
    # query tokens occur in its span, exactly, "+nb" which occur in its neighbours' spans (a key's block is found
    # by the lock's name in the block next to it). Each step measured better than the one before (docs/log.md).
    lensnet_input: str = "gist+mean+match+nb"
    n_head: int = 4  # heads of GistNet and LensNet (head_dim = n_embd / n_head must be even for RoPE)
    allocator: str = "greedy"  # "stochastic" samples edits; used to draw training variants
    # Refocusing scores a gist of level >= 2 as the best of its descendants too (allocator.lookahead_scores),
    # so the allocator can zoom from LOD2 to the raw evidence over successive refocuses.
    lookahead: bool = True
    # A LOD1 gist or raw block just before or after an opened raw block scores as that block
    # (allocator.flank_scores): a key's label often ends in the block before it, its restatement follows in the
    # next. Passkey at 4x 74-88 -> 94-98 % on two seeds (log.md, 2026-12-07).
    flank: bool = True
    tau_expand: float = 0.2  # expand only when score > tau_expand (hysteresis band around 0)
    tau_collapse: float = 0.2  # collapse only when score < -tau_collapse
    n_diff: int = 4  # at most this many edits per refocus
    cooldown: int = 2  # refocuses before a block may flip direction again
    variants: int = 4  # N: one-edit variants per training row besides the baseline and the base
    # Per row, the base zooms this many "copy hint" blocks to LOD1 and their expansions are variants first
    # (plans.copy_hints: blocks holding an earlier occurrence of a horizon n-gram), so the designed experiment
    # measures the evidence block instead of ~1 in 30.
    copy_hints: int = 2
    # And this many of LensNet's own favourites (the base's gists it scores highest, not copy hints): hard
    # negatives, so a look-alike the lens would open gets its cost measured (a third fewer distractors opened).
    lens_hints: int = 1
    horizon: int = REFERENCE.horizon  # H: shared recent tail where variants' losses are compared
    lens_weight: float = 0.1  # weight of the LensNet ranking loss in the total loss
    # Weight, inside the lens loss, of the listwise term (training.lens_top_loss): the best measured candidate
    # should outscore every editable entry of the WC, not only the other measured candidates.
    lens_listwise: float = 1.0
    # Weight of the next-token loss on the raw positions BEFORE the horizon of every working context: the
    # horizon alone gives the GPT ~H loss positions per working context; without it the MC model's val bpb
    # trailed the vanilla one's by 0.5 (docs/log.md).
    lm_weight: float = 1.0
    # Weight of the plain vanilla loss over each whole raw row (one more GPT forward per row, no gists): the GPT
    # keeps in-context copying, which decayed under the working-context losses alone (probe 0.86 -> 0.08). At 3
    # rather than 1 the GPT reads what the focus opens better and writes better text (val bpb 1.68 -> 1.52-1.53,
    # MQAR-8 at 4x 52 -> 56-80 %, LongDoc 31-33 -> 47-49 / 50); at 5, two seeds, text better again (1.46-1.49),
    # passkeys at 256x 94 / 84 % (94 / 46 at 3), variable tracking at 16x 52-56 % (44-50), chat level (docs/log.md).
    full_weight: float = 5.0
    # Highest gist level training makes and working contexts use (2 = LOD2, K² tokens). Higher levels are used
    # only when a history does not fit the budget otherwise (level_cap): GistNet never learned to make them.
    wc_levels: int = 2
    # Curriculum: the working-context budget starts at this fraction of the sequence length and anneals to
    # wc_budget over the first half of training (docs/design.md §4.6). 0 = no curriculum.
    curriculum_start: float = 0.5

    @classmethod
    def for_seq_len(cls, seq_len: int, **overrides) -> MCConfig:
        """The recipe at a training length: scale-dependent fields from `scale`, the rest the defaults."""
        s = scale(seq_len)
        base = {
            "block_size": s.block_size,
            "wc_budget": s.wc_budget,
            "recent": s.recent,
            "horizon": s.horizon,
        }
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

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
            "lens_hints",
            "horizon",
            "tau_expand",
            "tau_collapse",
            "lens_weight",
            "lens_listwise",
            "lm_weight",
            "full_weight",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"MegaContext {name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MCConfig:
        """The config a checkpoint recorded. Keys this version does not know are refused, not dropped; a
        removed setting loads only at the value the code still implements (REMOVED)."""
        d = dict(d)
        for key, kept in REMOVED.items():
            if key in d and (value := d.pop(key)) != kept:
                raise UserError(
                    f"this checkpoint was trained with MegaContext {key}={value!r}, a setting this version removed "
                    f"(only {kept!r} remains, docs/log.md); retrain it or use an older version"
                )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown MegaContext config keys {unknown} (written by another version?); known: {sorted(known)}"
            )
        return cls(**d)


# ----------------------------------------------------------------------------- flags shared by every stage


def add_mc_args(parser) -> None:
    """`--mc` and the two scale overrides. Everything else is the recipe (MCConfig's defaults); the device
    batch shrinks so an MC step holds about as many GPT positions as a vanilla one (auto_device_batch)."""
    g = parser.add_argument_group("MegaContext (docs/training.md)")
    g.add_argument("--mc", action="store_true", help="train GistNet + LensNet with the GPT (MegaContext)")
    g.add_argument(
        "--mc-wc-budget", type=int, default=None, help="working-context budget (default: max-seq-len / 4)"
    )
    g.add_argument(
        "--mc-block-size", type=int, default=None, help="tokens per gist, K (default: budget / 8 in [16, 32])"
    )


def mc_config_from_args(args, seq_len: int) -> MCConfig | None:
    """The recipe's MCConfig at seq_len with the flags' overrides, or None without --mc. A budget override
    re-derives what scales with it (K, recent, horizon) unless K is given too."""
    if not getattr(args, "mc", False):
        return None
    budget, K = args.mc_wc_budget, args.mc_block_size
    if budget is None:
        return MCConfig.for_seq_len(seq_len, block_size=K)
    s = scale(4 * budget)  # the geometry of a row whose budget this is
    K = K or s.block_size
    return MCConfig.for_seq_len(
        seq_len, wc_budget=budget, block_size=K, recent=max(K, budget // 4), horizon=max(1, K // 2)
    )


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
