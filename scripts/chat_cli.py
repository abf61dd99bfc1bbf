"""Chat with a trained model in the terminal; with MegaContext its memory never runs out.

    python -m scripts.chat_cli                              # latest sft checkpoint, interactive
    python -m scripts.chat_cli -p "Why is the sky blue?"    # one reply, then exit
    python -m scripts.chat_cli --session ~/chats/work       # resume (and keep) a persistent memory
    python -m scripts.chat_cli --source mid --no-mc         # plain nanochat context, no memory

MegaContext is on by default when the checkpoint was trained with it: every turn goes into the MegaContext
tree and the model decodes on a working context of at most W_max entries (megacontext/session.py). With
--session DIR the tree lives on disk in DIR and the session is saved after every reply, so a later run with
the same DIR continues the conversation. Commands: /memory (the LOD map of the working context and the tree
size), /clear (start afresh), /quit.

A reply may call the python tool (`<|python_start|> code <|python_end|>`): the code runs in the sandbox
(nanochat/execution.py), its output goes back into the turn, and both show as fenced blocks, never as special
tokens. A long message (a pasted document) shows how much of it the memory has read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megacontext.attention_modes import attention_model
from megacontext.session import INGEST_CHUNK, MCSession, load_mc_nets
from megacontext.session_store import STATE_FILE
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, compute_init, run_main
from nanochat.engine import RecomputeEngine, ReplyText, ToolUse, chat_engine, session_turn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--prompt", type=str, default=None, help="answer this one prompt and exit")
    p.add_argument("--source", type=str, default="sft", help="checkpoint family: base|mid|sft|rl")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--mc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MegaContext memory (default: on when the checkpoint has MC weights)",
    )
    p.add_argument(
        "--session", type=Path, default=None, help="directory of a persistent MC session (resumed)"
    )
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (default: autodetect)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.max_tokens < 1 or args.top_k < 0:
        raise UserError("--temperature must be >= 0, --max-tokens >= 1 and --top-k >= 0")
    return args


class PlainChat:
    """MC off: the whole conversation is the model's context (python tool live): the GPT with its KV cache,
    bounded by sequence_len, or an attention-mode model (window, MegaAttention) run over the whole sequence per
    token, bounded by its rotary table."""

    def __init__(self, model, tokenizer):
        self.engine, self.tokenizer = chat_engine(model, tokenizer), tokenizer
        self.limit = (
            model.rotary_len if isinstance(self.engine, RecomputeEngine) else model.config.sequence_len
        )
        self.tokens = [tokenizer.get_bos_token_id()]

    def add_user_message(self, text: str) -> None:
        tok = self.tokenizer
        self.tokens += [
            tok.encode_special("<|user_start|>"),
            *tok.encode(text),
            tok.encode_special("<|user_end|>"),
        ]
        self.tokens.append(tok.encode_special("<|assistant_start|>"))

    def reply(self, max_tokens: int, temperature: float, top_k: int | None, seed: int):
        """The assistant's tokens, the tool's output among them (forced in by the engine)."""
        room = self.limit - len(self.tokens)
        if room < 1:
            raise UserError(
                f"the conversation fills the model's {self.limit}-token context: /clear, or chat with --mc"
            )
        end = self.tokenizer.encode_special("<|assistant_end|>")
        stops = self.engine.stop_tokens
        for column, _ in self.engine.generate(
            self.tokens, max_tokens=min(max_tokens, room), temperature=temperature, top_k=top_k, seed=seed
        ):
            token = column[0]
            if token in stops:
                break
            self.tokens.append(token)
            yield token
        self.tokens.append(end)  # the turn is closed whether the model ended it or max_tokens did

    def describe(self) -> str:
        return f"MegaContext is off: the context holds {len(self.tokens)} of {self.limit} tokens"


def describe_memory(session: MCSession) -> str:
    """The /memory report: the LOD map of the working context, its cost and the tree's size."""
    m = session.memory()
    levels = ", ".join(f"LOD{lv}: {n}" for lv, n in enumerate(m["tree_nodes"]))
    edits = ", ".join(f"{e['kind']} L{e['level']} {e['start']}:{e['end']}" for e in m["last_edits"]) or "none"
    return (
        f"working context: {m['cost']}/{m['budget']} (residency {m['residency']:.2f}), "
        f"{len(m['entries'])} entries\n{m['render']}\n"
        f"tree: {m['num_tokens']} tokens ({levels}); refocuses {m['refocuses']}, "
        f"last edits (refocus {m['last_edits_refocus']}): {edits}"
    )


def add_user_message(chat, text: str) -> None:
    """The user's turn. Into a memory session it goes as MCSession.add_user_message renders it, and a message
    longer than one ingest chunk (a pasted document) reports its progress on stderr as it is read."""
    if not isinstance(chat, MCSession):
        chat.add_user_message(text)
        return

    def progress(done: int, total: int) -> None:
        if total <= INGEST_CHUNK:  # one chunk: nothing to watch
            return
        end = "\n" if done == total else ""
        print(f"\r(read {done:,} of {total:,} tokens into memory)", end=end, file=sys.stderr, flush=True)

    chat.add_user_message(text, progress)


def main(argv=None) -> None:
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type, args.seed)
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = build_model(ckpt_dir, step, device, "eval")
    # a window / mega checkpoint chats under its own attention
    model = attention_model(model, ckpt_dir, step, meta, device)
    mc = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, device) if args.mc is not False else None
    if args.mc and mc is None:
        raise UserError(
            f"--mc: checkpoint {ckpt_dir} step {step} was trained without MegaContext (use --no-mc)"
        )
    if args.session is not None and mc is None:
        raise UserError("--session keeps a MegaContext memory; this chat runs without MC (drop --no-mc?)")

    def new_chat(resume: bool):
        if mc is None:
            return PlainChat(model, tokenizer)
        cfg, gistnet, lensnet = mc
        if args.session is None:
            return MCSession(model, tokenizer, gistnet, lensnet, cfg, device=device, seed=args.seed)
        if resume and (args.session / STATE_FILE).exists():
            return MCSession.open(args.session, model, tokenizer, gistnet, lensnet, device)
        session = MCSession.create(args.session, model, tokenizer, gistnet, lensnet, cfg, device, args.seed)
        session.save(args.session)
        return session

    def turn(text: str) -> None:
        add_user_message(chat, text)
        sampling = (args.max_tokens, args.temperature, args.top_k or None, args.seed)
        if isinstance(chat, MCSession):
            tokens = (token for token, _ in session_turn(chat, ToolUse(tokenizer), *sampling))
        else:
            tokens = chat.reply(*sampling)
        shown = ReplyText(tokenizer)  # text as it streams in; a tool call as a code block and its output
        for token in tokens:
            print(shown.feed(token), end="", flush=True)
        print(shown.finish(), flush=True)
        if args.session is not None:
            chat.save(args.session)

    chat = new_chat(resume=True)
    try:
        if args.prompt is not None:
            turn(args.prompt)
            return
        mode = f"MegaContext on (W_max {mc[0].wc_budget})" if mc else "MegaContext off"
        print(f"nanochat {args.source} {ckpt_dir.name} step {step}, {mode}. /memory, /clear, /quit.")
        if isinstance(chat, MCSession) and chat.messages:
            print(f"(resumed a session of {len(chat.messages)} messages, {chat.tree.num_tokens} tokens)")
        while True:
            try:
                text = input("\nUser: ").strip()
            except EOFError:
                print()
                break
            if text in ("/quit", "/exit"):
                break
            if text == "/memory":
                print(describe_memory(chat) if isinstance(chat, MCSession) else chat.describe())
                continue
            if text == "/clear":
                if isinstance(chat, MCSession):
                    chat.close()
                chat = new_chat(resume=False)
                print("(memory cleared)")
                continue
            if not text:
                continue
            print("Assistant: ", end="", flush=True)
            try:
                turn(text)
            except UserError as e:  # e.g. a full plain context: say so and keep the chat alive
                print(f"\nerror: {e}", file=sys.stderr, flush=True)
    finally:
        if isinstance(chat, MCSession):
            chat.close()


if __name__ == "__main__":
    run_main(main)
