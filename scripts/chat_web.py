"""Chat in the browser, and an OpenAI-compatible API, served by FastAPI + uvicorn.

    python -m scripts.chat_web                          # http://127.0.0.1:8000, latest sft checkpoint
    python -m scripts.chat_web --source mid --no-mc --port 8080

Endpoints: GET / (the chat page, nanochat/ui.html, with a memory panel), POST /v1/chat/completions (OpenAI
chat completions, streaming as server-sent events or not; the official `openai` client works against it),
GET /v1/models, GET /health, GET /memory (the working context of the last request, for the panel).

A reply may call the python tool: the code runs in the sandbox (nanochat/execution.py) and the reply's text
shows the call and its output as fenced blocks (```python ... ``` then ```output ... ```), never special
tokens; an assistant message sent back in that form is read as the call it was. A streamed request over an MC
model first reports how much of its prompt the memory has read, as SSE comments (`: ingest {"done": n,
"total": N}`; clients that do not know them ignore them), so a long paste shows progress; the prompt is
tokenized and ingested off the event loop, so the server answers other requests meanwhile.

Requests are stateless as in the OpenAI API: each one renders its messages into a fresh MegaContext session
(a long conversation or a pasted document goes into the tree, the GPT decodes on a working context of at
most W_max entries), or with MC off into plain nanochat context. Model workers (one per device, each with its
own model copy and cache) wait in an asyncio queue; a request takes one, generates in a thread, and gives it
back, so concurrent requests queue instead of sharing a cache. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import nanochat
from megacontext.attention_modes import attention_model
from megacontext.session import load_mc_nets
from nanochat.chat_worker import Worker, start_generation, text_deltas
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.common import UserError, resolve_device_type, run_main
from nanochat.engine import RecomputeEngine, reply_parts

UI_PATH = Path(nanochat.__file__).parent / "ui.html"


class ApiError(Exception):
    """A bad request, answered as an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_json(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def parse_chat_request(body, model_name: str, max_tokens_cap: int, defaults: dict) -> dict:
    """Validate an OpenAI chat-completions body; returns the conversation and sampling settings."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server serves {model_name!r}",
            "model",
            "model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI content parts: only text parts are understood here
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400, f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages"
            )
        if not isinstance(content, str) or (not content and role != "assistant"):  # a model may say nothing
            raise ApiError(400, f"messages[{i}].content must be a non-empty string", "messages")
        clean.append({"role": role, "content": reply_parts(content) if role == "assistant" else content})
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            roles = [m["role"] for m in clean]
            raise ApiError(
                400,
                f"roles must alternate user/assistant after an optional system message, "
                f"starting and ending with user; got {roles}",
                "messages",
            )
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", "messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = defaults["max_tokens"] if max_tokens is None else max_tokens
    temperature = body.get("temperature")
    temperature = defaults["temperature"] if temperature is None else temperature
    top_k = body.get("top_k", defaults["top_k"])
    seed = body.get("seed")
    stream = body.get("stream", False)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_cap:
        raise ApiError(400, f"max_tokens must be an integer in [1, {max_tokens_cap}]", "max_tokens")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise ApiError(400, "temperature must be a number in [0, 2]", "temperature")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ApiError(400, "top_k must be a positive integer", "top_k")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "seed must be an integer", "seed")
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    seed = random.randrange(2**31) if seed is None else seed
    return {
        "conversation": {"messages": clean},
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_k": top_k,
        "seed": seed,
        "stream": stream,
    }


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the {limit}-byte limit")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def create_app(
    workers: list[Worker],
    model_name: str = "nanochat",
    max_body_bytes: int = 1 << 20,
    max_tokens_cap: int = 2048,
    default_max_tokens: int = 512,
    temperature: float = 0.8,
    top_k: int | None = 50,
) -> FastAPI:
    """The app over a pool of workers (tests pass tiny in-process models; main() loads checkpoints)."""
    if not workers:
        raise ValueError("create_app needs at least one worker")
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)
    pool: asyncio.Queue[Worker] = asyncio.Queue()  # binds to the serving loop on first use
    for w in workers:
        pool.put_nowait(w)
    tokenizer = workers[0].tokenizer
    mc_on = workers[0].mc is not None
    w0 = workers[0]  # an attention-mode model runs past sequence_len, to its rotary table (RecomputeEngine)
    seq_len = w0.model.rotary_len if isinstance(w0.engine, RecomputeEngine) else w0.model.config.sequence_len
    defaults = {"max_tokens": default_max_tokens, "temperature": temperature, "top_k": top_k}
    state = {"memory": None}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_json(e.status, e.message, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_json(e.status_code, str(e.detail))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(UI_PATH.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "mc": mc_on,
            "workers": len(workers),
            "idle": pool.qsize(),
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}],
        }

    @app.get("/memory")
    async def memory():
        return {"mc": mc_on, **(state["memory"] or {})}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(
            await read_json(request, max_body_bytes), model_name, max_tokens_cap, defaults
        )
        try:  # off the event loop: a long paste takes a while to tokenize
            ids = await asyncio.to_thread(tokenizer.render_for_completion, req["conversation"])
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        if not mc_on and len(ids) + req["max_tokens"] > seq_len:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req['max_tokens']}) exceeds the model's "
                f"{seq_len}-token context (MegaContext is off)",
                "messages",
                "context_length_exceeded",
            )
        worker = await pool.get()
        events, cancel = start_generation(worker, ids, req, pool, lambda m: state.__setitem__("memory", m))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish=None) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        if req["stream"]:

            async def sse():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for kind, value in text_deltas(events, tokenizer):
                        if kind == "progress":
                            yield f": ingest {json.dumps({'done': value[0], 'total': value[1]})}\n\n"
                        elif kind == "text":
                            yield chunk({"content": value})
                        else:
                            if value[0]:
                                yield chunk({"content": value[0]})
                            yield chunk({}, value[1])
                    yield "data: [DONE]\n\n"
                except RuntimeError as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                finally:
                    cancel.set()  # the client left or we are done: free the worker at its next token

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        parts, finish, n_out = [], "stop", 0
        try:
            async for kind, value in text_deltas(events, tokenizer):
                if kind == "text":
                    parts.append(value)
                elif kind == "end":
                    parts.append(value[0])
                    finish, n_out = value[1:]
        except RuntimeError as e:
            return error_json(500, str(e))
        finally:
            cancel.set()
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": n_out,
                "total_tokens": len(ids) + n_out,
            },
        }

    return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=str, default="sft", help="checkpoint family: base|mid|sft|rl")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--mc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MegaContext memory (default: on when the checkpoint has MC weights)",
    )
    p.add_argument("--host", type=str, default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (default: autodetect)")
    p.add_argument(
        "--num-workers", type=int, default=0, help="model copies (default: one per CUDA device, else 1)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="default top-k (0 = all tokens)")
    p.add_argument("--max-tokens", type=int, default=512, help="default reply length")
    p.add_argument(
        "--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask for"
    )
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body, KiB")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import uvicorn

    args = parse_args(argv)
    device_type = resolve_device_type(args.device_type)
    if device_type == "cuda":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        devices = devices[: args.num_workers] if args.num_workers else devices
    else:
        devices = [device_type] * max(1, args.num_workers)
    if not 1 <= args.max_tokens <= args.max_tokens_cap:
        raise UserError(f"--max-tokens must lie in [1, --max-tokens-cap={args.max_tokens_cap}]")
    ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    workers = []
    for device in devices:
        model, tokenizer, meta = build_model(ckpt_dir, step, device, "eval")
        model = attention_model(model, ckpt_dir, step, meta, device)  # window / mega: its own attention
        mc = load_mc_nets(ckpt_dir, step, meta, model.config.n_embd, device) if args.mc is not False else None
        if args.mc and mc is None:
            raise UserError(f"--mc: checkpoint {ckpt_dir} step {step} was trained without MegaContext")
        workers.append(Worker(model, tokenizer, device, mc))
    name = f"nanochat-{args.source}-{ckpt_dir.name}"
    app = create_app(
        workers,
        name,
        args.max_body_kb * 1024,
        args.max_tokens_cap,
        args.max_tokens,
        args.temperature,
        args.top_k or None,
    )
    print(
        f"serving {name} step {step} ({'MC on' if workers[0].mc else 'MC off'}, {len(workers)} worker(s)) "
        f"at http://{args.host}:{args.port}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
