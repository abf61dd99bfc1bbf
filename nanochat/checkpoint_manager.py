"""Saving and loading training checkpoints, crash-safe.

Layout: get_base_dir()/<source>_checkpoints/<model_tag>/ with, per step,
    model_<step:06d>.pt              {"model": GPT state_dict, "mc": {"gistnet": ..., "lensnet": ...}}
                                     ("mc" only when MegaContext nets were trained alongside; with
                                     --attention mega it holds {"mega_gistnet", "mega_prediction"})
    optim_<step:06d>.pt              list of optimizer state_dicts ([AdamW, Muon]), written by rank 0
    meta_<step:06d>.json             step, model_config, tokenizer_id, dataloader state, user config, "mc",
                                     "attention" (megacontext.attention_modes; absent = dense)

World-size independent: the weights and the optimizer state are replicated on every rank
(nanochat.optim: each rank steps on the same averaged gradients), so rank 0's copy is the whole state and
every rank of a resumed run, however many there are, loads the same files; save_checkpoint checks that
the ranks agree. The loader state is one state per lane (nanochat.dataloader), also independent of the
ranks. Checkpoints written before this kept one optim_<step>_rank<r>.pt per rank; rank 0's is loaded.

Every file is written atomically (temp + fsync + rename), and meta is written last: it is the commit
point. A step counts only when its meta and a complete model file are both there, so a crash at any
moment leaves either the previous step or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import UserError, atomic_torch_save, atomic_write_json, get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

SOURCE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
META_RE = re.compile(r"^meta_(\d{6,})\.json$")


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit the model or tokenizer."""


def model_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.pt"


def meta_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"


def optim_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}.pt"


def _legacy_optim_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank0.pt"  # one file per rank, all alike, before


def tokenizer_id(directory: str | Path | None = None) -> str:
    """Short hash of tokenizer.json: which tokenizer a checkpoint was trained with."""
    path = Path(directory or get_base_dir() / "tokenizer") / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer at {path.parent}: run `python -m scripts.tok_train` first")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_state: dict | None,
    optim_states: list | None,
    meta: dict,
    rank: int = 0,
    mc_state: dict | None = None,
) -> None:
    """Every rank calls this (it holds collectives). Rank 0 writes the model and the optimizer states
    and then, once all ranks are done (barrier), the meta that commits the step.

    meta must hold "model_config"; "step" is filled in. mc_state: extra modules' state dicts by name.
    optim_states: every rank passes its own; they are compared across ranks and rank 0's are saved.
    """
    ckpt_dir = Path(ckpt_dir)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if optim_states is not None and distributed:
        _warn_if_ranks_differ(optim_states, step)
    if rank == 0:
        if "model_config" not in meta:
            raise ValueError("checkpoint meta needs 'model_config' to rebuild the model")
        payload = {"model": model_state}
        if mc_state is not None:
            payload["mc"] = mc_state
        atomic_torch_save(payload, model_path(ckpt_dir, step))
        if optim_states is not None:
            atomic_torch_save(list(optim_states), optim_path(ckpt_dir, step))
    if distributed:
        dist.barrier()  # no rank runs ahead of a step that is not yet on disk
    if rank == 0:
        atomic_write_json(meta_path(ckpt_dir, step), {**meta, "step": step})
        logger.info("saved checkpoint step %d to %s", step, ckpt_dir)


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors of a nested state dict, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in _tensors(x)]
    return []


def _warn_if_ranks_differ(optim_states: list, step: int) -> None:
    """Rank 0's optimizer state stands for every rank's; say so loudly if the ranks have drifted apart
    (e.g. GPUs that round differently), since the checkpoint then keeps rank 0's trajectory only."""
    tensors = _tensors(optim_states)
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    sums = [torch.nan_to_num(t.detach().double().sum()).to(device) for t in tensors]
    local = torch.stack([torch.tensor(float(len(tensors)), dtype=torch.float64, device=device), *sums])
    n = torch.tensor([local.numel()], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if n.item() != local.numel():  # a rank with more tensors: pad so the collectives line up, then differ
        local = torch.cat([local, torch.full((int(n.item()) - local.numel(),), math.nan, device=device)])
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi) and dist.get_rank() == 0:
        logger.warning(
            "step %d: the ranks' optimizer states differ (largest gap %.3g); the checkpoint keeps rank 0's",
            step,
            (hi - lo).abs().nan_to_num(math.inf).max().item(),
        )


def _torch_load(path: Path, device, mmap: bool = False):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None


def load_meta(ckpt_dir: str | Path, step: int) -> dict:
    path = meta_path(ckpt_dir, step)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir} (missing {path.name})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated") from None


def load_checkpoint(
    ckpt_dir: str | Path, step: int, device, load_optimizer: bool = False
) -> tuple[dict, list | None, dict]:
    """(GPT state_dict, optimizer states or None, meta); the same files for any number of ranks."""
    meta = load_meta(ckpt_dir, step)
    payload = _torch_load(model_path(ckpt_dir, step), device)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"checkpoint {model_path(ckpt_dir, step)} has no 'model' state dict")
    optim_states = None
    if load_optimizer:
        path = optim_path(ckpt_dir, step)
        if not path.is_file() and _legacy_optim_path(ckpt_dir, step).is_file():
            path = _legacy_optim_path(ckpt_dir, step)
        optim_states = _torch_load(path, device)
    return payload["model"], optim_states, meta


def resume_step(ckpt_dir: str | Path, requested: int) -> int | None:
    """The step --resume-from-step asks for: N >= 0 is step N, -1 a fresh run (None), -2 the latest
    committed step or a fresh run when there is none, so one command line serves a first start and every
    restart (torchrun --max-restarts). Under torchrun rank 0 decides and tells the others (a multi-node
    run needs the checkpoint directory on a filesystem every node sees)."""
    if requested < -2:
        raise UserError(f"--resume-from-step must be a step >= 0, -1 (none) or -2 (latest), got {requested}")
    step = requested if requested >= 0 else None
    if requested == -2:
        try:
            step = find_last_step(ckpt_dir)
        except CheckpointError:
            step = None
    if dist.is_available() and dist.is_initialized():
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    return step


def load_mc_state(ckpt_dir: str | Path, step: int, device) -> dict:
    """The MegaContext nets' state dicts saved with the GPT ({"gistnet": ..., "lensnet": ...}).

    The file is memory-mapped, so the GPT weights in it are not read a second time.
    """
    load_meta(ckpt_dir, step)  # only committed steps
    payload = _torch_load(model_path(ckpt_dir, step), device, mmap=True)
    if not isinstance(payload, dict) or "mc" not in payload:
        raise CheckpointError(f"checkpoint {model_path(ckpt_dir, step)} holds no MegaContext state")
    return payload["mc"]


def _is_committed(ckpt_dir: Path, step: int) -> bool:
    """Meta parses and the model file is a complete zip (torch's format; a cut file lacks its end record)."""
    try:
        json.loads(meta_path(ckpt_dir, step).read_text())
    except (OSError, ValueError):
        return False
    path = model_path(ckpt_dir, step)
    return path.is_file() and zipfile.is_zipfile(path)


def find_last_step(ckpt_dir: str | Path) -> int:
    """Largest committed step in ckpt_dir (meta and a complete model file both present)."""
    ckpt_dir = Path(ckpt_dir)
    steps = sorted((int(m.group(1)) for f in _listdir(ckpt_dir) if (m := META_RE.match(f))), reverse=True)
    for step in steps:
        if _is_committed(ckpt_dir, step):
            return step
        logger.warning("skipping step %d in %s: its files are incomplete", step, ckpt_dir)
    raise CheckpointError(f"no checkpoints found in {ckpt_dir}")


def _listdir(path: Path) -> list[str]:
    return [p.name for p in path.iterdir()] if path.is_dir() else []


def _strip_compile_prefix(state: dict) -> dict:
    # A state dict taken from a torch.compile'd model names every key "_orig_mod.<name>".
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def check_state_matches(model: torch.nn.Module, state: dict, source: str) -> None:
    """One clear line naming the first key that differs between the model and a state dict."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {source} lacks {key}: it was saved from a different model")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {source} does not fit its model_config: {key} has shape "
                f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model"
            )
    for key in state:
        if key not in expected:
            raise CheckpointError(
                f"checkpoint {source} has unexpected key {key}: it was saved from a different model"
            )


def build_model(ckpt_dir: str | Path, step: int, device, phase: str = "eval"):
    """Rebuild the GPT from a checkpoint's meta, load its weights (strict) and the tokenizer.

    Returns (model, tokenizer, meta). phase "eval" or "train" sets the module mode.
    """
    from nanochat.tokenizer import get_tokenizer  # a missing tokenizer raises its own UserError

    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    model_state = _strip_compile_prefix(model_state)
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {meta_path(ckpt_dir, step)} has a bad model_config ({e})"
        ) from None
    with torch.device("meta"):  # no memory or init work for weights that are about to be overwritten
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the (non-persistent) rotary tables
    check_state_matches(model, model_state, str(model_path(ckpt_dir, step)))
    model.load_state_dict(model_state, strict=True)
    model.train(phase == "train")

    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but checkpoint {ckpt_dir} step {step} was "
            f"trained with {config.vocab_size}: restore the tokenizer it was trained with"
        )
    saved_id = meta.get("tokenizer_id")
    if saved_id is not None and saved_id != tokenizer_id():
        raise CheckpointError(
            f"checkpoint {ckpt_dir} step {step} was trained with tokenizer {saved_id}, but "
            f"{get_base_dir() / 'tokenizer'} holds {tokenizer_id()}: restore the tokenizer it was trained with"
        )
    return model, tokenizer, meta


def find_largest_model(checkpoints_dir: str | Path) -> str:
    """The tag to load by default: largest depth among tags "d<N>", else the most recently written."""
    checkpoints_dir = Path(checkpoints_dir)
    tags = [p.name for p in checkpoints_dir.iterdir() if p.is_dir()] if checkpoints_dir.is_dir() else []
    tags = [t for t in tags if any(META_RE.match(f) for f in _listdir(checkpoints_dir / t))]
    if not tags:
        raise CheckpointError(f"no checkpoints found in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: (checkpoints_dir / t).stat().st_mtime)


def resolve_checkpoint(
    source: str, model_tag: str | None = None, step: int | None = None
) -> tuple[Path, int]:
    """(checkpoint dir, step) for a source ("base" | "mid" | "sft" | "rl"); largest tag and latest step
    unless told."""
    if source not in SOURCE_DIRS:
        raise CheckpointError(f"unknown checkpoint source {source!r}; choose one of {', '.join(SOURCE_DIRS)}")
    checkpoints_dir = get_base_dir() / SOURCE_DIRS[source]
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    ckpt_dir = checkpoints_dir / model_tag
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoints found in {ckpt_dir}")
    if step is None:
        step = find_last_step(ckpt_dir)
    return ckpt_dir, step


def load_model(
    source: str, device, phase: str = "eval", model_tag: str | None = None, step: int | None = None
):
    """(model, tokenizer, meta) from the latest checkpoint of a training stage."""
    ckpt_dir, step = resolve_checkpoint(source, model_tag, step)
    return build_model(ckpt_dir, step, device, phase)
