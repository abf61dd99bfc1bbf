"""Saving and reopening an MCSession (docs/chat.md "Persistence").

A saved session is a directory: the tree (disk backend, `tree-<id>/`) and session.json (WC entries, allocator,
conversation, RNG), written atomically and last: it is the commit point, so a crash mid-save leaves the previous
save intact. Reopening continues exactly where the saved session stood, so the next greedy reply is identical.
MCSession.create / save / open are the API; these functions are what they run.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from megacontext.config import MCConfig
from megacontext.entries import Edit, Entry
from megacontext.tree import MegaContextTree, copy_tree
from megacontext.working_context import WorkingContext
from nanochat.common import UserError, atomic_write_json

STATE_FILE = "session.json"
STATE_FORMAT, STATE_VERSION = "megacontext-session", 1


def _tree_name() -> str:
    return f"tree-{uuid.uuid4().hex[:8]}"


def new_disk_tree(directory, K: int, d: int, model_id: str) -> MegaContextTree:
    """An empty tree on disk inside `directory`, where save() commits it in place."""
    return MegaContextTree.open(Path(directory) / _tree_name(), K=K, d=d, model_id=model_id)


def save_session(session, directory) -> None:
    """Persist the session in `directory`: the tree (committed in place when it already lives there, else
    copied), then session.json atomically. Older tree copies in the directory are removed afterwards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = getattr(session.tree.storage, "path", None)
    if path is not None and path.resolve().parent == directory.resolve():
        session.tree.flush()
        tree_name = path.name
    else:
        tree_name = _tree_name()
        copy_tree(session.tree, directory / tree_name).close()
    wc = session.wc
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "tree": tree_name,
        "model_id": session.model_id,
        "config": session.cfg.to_dict(),
        "num_tokens": session.tree.num_tokens,
        "entries": [[e.level, e.start, e.end] for e in wc.entries] if wc else None,
        "wc_version": wc.version if wc else 0,
        "refocus_at": session.refocus_at,
        "level_cap": session.view.cap,
        "allocator": session.allocator.state_dict(),
        "rng": base64.b64encode(session.rng.get_state().numpy().tobytes()).decode("ascii"),
        "messages": session.messages,
        "last_edits": [[e.kind, e.level, e.index] for e in session.last_edits],
        "last_edits_refocus": session.last_edits_refocus,
        "refocuses": session.telemetry.total_refocuses,
    }
    atomic_write_json(directory / STATE_FILE, state)  # the commit point
    for old in directory.glob("tree-*"):
        if old.is_dir() and old.name != tree_name:
            shutil.rmtree(old)


def open_session(cls, directory, model, tokenizer, gistnet, lensnet, device, model_id: str):
    """Continue the session saved in `directory` as a `cls` (MCSession). Tokens the tree committed after the
    last save (e.g. a reply interrupted before it was saved) are kept: the WC is extended over them."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"format {state.get('format')!r} v{state.get('version')}")
        cfg = MCConfig.from_dict(state["config"])
    except FileNotFoundError:
        raise UserError(f"no saved session in {directory} (missing {STATE_FILE})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory / STATE_FILE} is not a valid saved session ({e})") from None
    tree = MegaContextTree.open(directory / state["tree"], model_id=model_id)
    if tree.num_tokens < state["num_tokens"]:
        tree.close()
        raise UserError(
            f"{directory}: the tree holds {tree.num_tokens} tokens, the session saved "
            f"{state['num_tokens']}; the tree was damaged"
        )
    session = cls(model, tokenizer, gistnet, lensnet, cfg, tree, device, 0, model_id)
    if state["entries"] is not None:
        entries = [Entry(*e) for e in state["entries"]]
        session.wc = WorkingContext(entries, cfg.block_size, cfg.wc_budget, cfg.recent, state["wc_version"])
        session.view.cap = state.get("level_cap", max(cfg.wc_levels, *(e.level for e in entries)))
        session.wc.check(_Prefix(session.view, state["num_tokens"]))
        session._absorb()  # tokens committed after the save
    session.refocus_at = state["refocus_at"]
    session.allocator.load_state_dict(state["allocator"])
    rng = np.frombuffer(base64.b64decode(state["rng"]), dtype=np.uint8).copy()
    session.rng.set_state(torch.from_numpy(rng))
    session.messages = list(state["messages"])
    session.last_edits = [Edit(k, lv, i) for k, lv, i in state["last_edits"]]
    session.last_edits_refocus = state["last_edits_refocus"]
    session.telemetry.total_refocuses = state["refocuses"]
    return session


class _Prefix:
    """A tree seen at an earlier length (what the saved WC covered), for checking the saved WC against it."""

    def __init__(self, tree, num_tokens: int):
        self.tree, self.K, self.num_tokens, self.max_level = tree, tree.K, num_tokens, tree.max_level

    def num_nodes(self, level: int) -> int:
        return min(self.tree.num_nodes(level), self.num_tokens // self.K**level)
