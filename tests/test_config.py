"""The one recipe (megacontext/config.py): `base_train --mc` with no other MC flag trains what runcpu.sh measured
best, the scale rule derives the length-dependent values, and removed settings load only at their survivor."""

from __future__ import annotations

import pytest

from megacontext.config import REMOVED, MCConfig, mc_config_from_args, scale
from nanochat.common import UserError
from scripts.base_train import parse_args

# runcpu.sh's MegaContext flags before the recipe became the defaults (seq len 512), and the MCConfig defaults
# it did not override at the time: together, the model of docs/status.md's long-context table.
RUNCPU_FLAGS = {
    "block_size": 16,  # --mc-block-size 16
    "wc_budget": 128,  # --mc-wc-budget 128
    "recent": 32,  # --mc-recent 32
    "horizon": 8,  # --mc-horizon 8
    "variants": 4,  # --mc-variants 4
    "curriculum_start": 0.5,  # --mc-curriculum-start 0.5
    "lm_weight": 1.0,  # --mc-lm-weight 1.0
    "copy_hints": 2,  # --mc-copy-hints 2
    "lensnet_input": "gist+mean+match+nb",  # --lensnet-input gist+mean+match+nb
    "lens_listwise": 1.0,  # --mc-lens-listwise 1.0
    "lens_hints": 1,  # --mc-lens-hints 1
}
UNCHANGED_DEFAULTS = {
    "max_level": 8,
    "gistnet_type": "transformer",
    "gistnet_layers": 2,
    "gistnet_pooling": "query",
    "gistnet_head": "mlp",
    "lensnet_layers": 2,
    "lensnet_head": "mlp",
    "n_head": 4,
    "allocator": "greedy",
    "lookahead": True,
    "tau_expand": 0.2,
    "tau_collapse": 0.2,
    "n_diff": 4,
    "cooldown": 2,
    "lens_weight": 0.1,
    "wc_levels": 2,
}
# settings added since that recipe ran; the session's allocator reads them, training does not
ADDED = {"flank": True}
# settings changed since: the full-row loss weighs 5 (docs/log.md, "The full-row loss at three", "... at five")
CHANGED = {"full_weight": 5.0}
# --mc-token-loss marginal (now the only token loss), and the defaults of settings removed since
RUNCPU_REMOVED = {"token_loss": "marginal", "positions": "wc_index", "score_norm": "z", "match_hints": 0,
                  "gist_weight": 0.0, "tree_backend": "ram"}  # fmt: skip


def test_base_train_mc_alone_is_the_runcpu_recipe_at_512():
    args = parse_args(["--mc", "--max-seq-len", "512"])
    cfg = mc_config_from_args(args, args.max_seq_len)
    assert cfg.to_dict() == {**RUNCPU_FLAGS, **UNCHANGED_DEFAULTS, **ADDED, **CHANGED}
    assert REMOVED == RUNCPU_REMOVED  # what the removed settings were, in that recipe


def test_without_mc_there_is_no_config():
    args = parse_args(["--max-seq-len", "512"])
    assert mc_config_from_args(args, 512) is None


def test_scale_rule_keeps_the_recipe_ratios():
    s = scale(512)
    assert (s.block_size, s.wc_budget, s.recent, s.horizon, s.window) == (16, 128, 32, 8, 64)
    assert scale(256).window == 32 and scale(256).block_size == 16  # the MegaAttention recipe at T 256
    s = scale(2048)
    assert (s.block_size, s.wc_budget, s.recent, s.horizon, s.window) == (32, 512, 128, 16, 256)
    for T in (32, 64, 128, 256, 512, 1024, 2048, 4096, 16384):
        s = scale(T)
        cfg = MCConfig.for_seq_len(T)  # valid (MCConfig checks recent <= budget, K >= 2)
        assert T % s.block_size == 0 and s.recent <= s.wc_budget and 2 * s.block_size <= s.wc_budget
        assert (cfg.block_size, cfg.wc_budget, cfg.recent, cfg.horizon) == (
            s.block_size,
            s.wc_budget,
            s.recent,
            s.horizon,
        )


def test_budget_override_rescales_what_follows_it():
    args = parse_args(["--mc", "--max-seq-len", "2048", "--mc-wc-budget", "128"])
    cfg = mc_config_from_args(args, 2048)
    assert (cfg.block_size, cfg.wc_budget, cfg.recent, cfg.horizon) == (16, 128, 32, 8)
    args = parse_args(["--mc", "--max-seq-len", "512", "--mc-block-size", "8"])
    assert mc_config_from_args(args, 512).block_size == 8


def test_removed_settings_load_only_at_the_value_that_remains():
    saved = {**MCConfig().to_dict(), "positions": "wc_index", "score_norm": "z", "token_loss": "marginal"}
    assert MCConfig.from_dict(saved) == MCConfig()
    with pytest.raises(UserError, match="positions='global', a setting this version removed"):
        MCConfig.from_dict({**saved, "positions": "global"})
    with pytest.raises(UserError, match="unknown MegaContext config keys"):
        MCConfig.from_dict({**saved, "wormhole": 1})
