"""A chat model worker and the thread it generates in, for a server that must keep answering meanwhile.

A worker is one model copy on one device (with MegaContext: a fresh session per request over the prompt); it
serves one request at a time. start_generation runs it in a thread (torch releases the GIL) and turns its
tokens into an asyncio queue of events; text_deltas turns those into text as the client should see it, with
the prompt's reading progress first. scripts/chat_web.py pools workers behind its FastAPI app.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import torch

from megacontext.session import MCSession, model_fingerprint
from nanochat.engine import ReplyText, ToolUse, chat_engine, session_turn


@dataclass
class Worker:
    """One model copy on one device; serves one request at a time. mc = (cfg, gistnet, lensnet) or None."""

    model: torch.nn.Module
    tokenizer: object
    device: str = "cpu"
    mc: tuple | None = None
    model_id: str | None = field(default=None, init=False)

    def __post_init__(self):
        self.engine = chat_engine(self.model, self.tokenizer)
        if self.mc is not None:  # hashing the weights once, not per request
            self.model_id = model_fingerprint(self.model, self.mc[1])

    def generate(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_k,
        seed: int,
        on_memory=None,
        on_progress=None,
    ):
        """Yield the reply's tokens, the python tool's output among them (the stop token included, last).
        MC: a fresh session over the prompt; on_progress(done, total) as the memory reads it, on_memory(the
        panel's data) at the end."""
        if self.mc is None:
            for column, _ in self.engine.generate(
                ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed
            ):
                yield column[0]
                if column[0] in self.engine.stop_tokens:
                    return
            return
        cfg, gistnet, lensnet = self.mc
        session = MCSession(
            self.model,
            self.tokenizer,
            gistnet,
            lensnet,
            cfg,
            device=self.device,
            seed=seed,
            model_id=self.model_id,
        )
        try:
            session.ingest(ids, progress=on_progress)
            for token, _ in session_turn(
                session, ToolUse(self.tokenizer), max_tokens, temperature, top_k, seed
            ):
                yield token
        finally:
            if on_memory is not None:
                on_memory(memory_view(session))
            session.close()


def memory_view(session, excerpt_tokens: int = 96) -> dict:
    """The session's memory() for the panel, plus what the last refocus zoomed into: per expanded gist its
    span and the start of the text it covers (the first excerpt_tokens tokens, decoded from the tree)."""
    m = session.memory()
    m["zoomed"] = []
    for e in m["last_edits"]:
        if e["kind"] == "expand":
            ids = session.tree.tokens(e["start"], min(e["end"], e["start"] + excerpt_tokens)).tolist()
            text = ReplyText(session.tokenizer).render(ids)  # the history's special tokens are not shown
            m["zoomed"].append({**e, "text": text + ("…" if e["end"] - e["start"] > excerpt_tokens else "")})
    return m


class Cancelled(Exception):
    """Raised in the worker's thread to abandon a request whose client has gone."""


def start_generation(worker: Worker, ids: list[int], req: dict, pool: asyncio.Queue, on_memory):
    """Generate in a thread (torch releases the GIL, the event loop keeps serving). Returns the queue of events
    ("progress", (done, total)) while an MC model reads the prompt, ("token", id) ..., then ("done", finish
    reason) or ("error", message), and an Event that stops it early. The worker goes back to the pool when the
    thread ends."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def progress(done: int, total: int) -> None:
        if cancel.is_set():  # the client left during a long paste: stop reading it, free the worker
            raise Cancelled
        emit(("progress", (done, total)))

    def run() -> None:
        finish, error = "length", None
        try:
            gen = worker.generate(
                ids,
                req["max_tokens"],
                req["temperature"],
                req["top_k"],
                req["seed"],
                on_memory,
                on_progress=progress,
            )
            for token in gen:
                if cancel.is_set():
                    break
                if token in worker.engine.stop_tokens:
                    finish = "stop"
                    break
                emit(("token", token))
            gen.close()  # an MC session reports its memory before the client hears "done"
        except Cancelled:
            pass
        except Exception as e:  # reported to the client; the worker stays usable
            error = f"{type(e).__name__}: {e}"
        finally:
            loop.call_soon_threadsafe(pool.put_nowait, worker)
        emit(("error", error) if error else ("done", finish))

    threading.Thread(target=run, daemon=True).start()
    return events, cancel


async def text_deltas(events: asyncio.Queue, tokenizer):
    """("progress", (done, total)) while the prompt is read, ("text", delta) as tokens arrive (ReplyText: a
    tool call shows as a code block and its output; a cut UTF-8 character waits for its next byte), then
    ("end", (the rest of the text, finish reason, n tokens)). An ("error", msg) event raises RuntimeError."""
    text, n = ReplyText(tokenizer), 0
    while True:
        kind, value = await events.get()
        if kind == "progress":
            yield kind, value
        elif kind == "token":
            n += 1
            delta = text.feed(value)
            if delta:
                yield "text", delta
        elif kind == "done":
            yield "end", (text.finish(), value, n)
            return
        else:
            raise RuntimeError(value)
