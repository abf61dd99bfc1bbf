"""chat_web: the OpenAI client against a live localhost server, bad requests, 32 concurrent clients, the page."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from test_chat_cli import tool_model
from test_session import WORDS, tiny_cfg, tiny_model, tiny_nets, tiny_tokenizer

from megacontext.config import MCConfig
from megacontext.session import build_mc_nets
from nanochat.chat_worker import Worker
from nanochat.engine import ReplyText
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer
from scripts.chat_web import create_app, parse_chat_request

MODEL = "tiny-test"


class LiveServer:
    """uvicorn serving an app on a free localhost port, in a thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def mc_worker(**cfg_overrides) -> Worker:
    tok = tiny_tokenizer()
    cfg = tiny_cfg(**cfg_overrides)
    gistnet, lensnet = tiny_nets(cfg)
    return Worker(tiny_model(tok.get_vocab_size()), tok, "cpu", (cfg, gistnet, lensnet))


def expected_reply(worker: Worker, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """The greedy reply as the server shows it (ReplyText), computed directly (no server), and its finish
    reason."""
    ids = worker.tokenizer.render_for_completion({"messages": messages})
    out, finish = [], "length"
    for token in worker.generate(ids, max_tokens, 0.0, None, 0):
        if token in worker.engine.stop_tokens:
            finish = "stop"
            break
        out.append(token)
    return ReplyText(worker.tokenizer).render(out), finish


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    app = create_app(
        [mc_worker(), mc_worker()], MODEL, max_body_bytes=64 * 1024, max_tokens_cap=64, default_max_tokens=16
    )
    with LiveServer(app) as live:
        yield live
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    return mc_worker()


def test_openai_client_streams_a_completion(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "tell me about memory"},
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, temperature=0, max_tokens=24
    )
    deltas, finishes = [], []
    for chunk in stream:
        deltas.append(chunk.choices[0].delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    text, finish = expected_reply(reference, messages, 24)
    assert len([d for d in deltas if d]) >= 2  # it really streamed, piece by piece
    assert "".join(deltas) == text and finishes[-1] == finish
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    assert full.choices[0].message.content == text and full.choices[0].finish_reason == finish
    assert full.usage.prompt_tokens > 5 and full.usage.completion_tokens >= 1


def test_page_health_and_memory_panel_data(server):
    page = httpx.get(server.url + "/")
    assert (
        page.status_code == 200 and 'id="memory-panel"' in page.text and "/v1/chat/completions" in page.text
    )
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["mc"] is True and health["workers"] == 2
    long_doc = " ".join(["the lens decides what to zoom into"] * 300)  # far beyond W_max = 64
    r = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": long_doc}], "max_tokens": 12},
    )
    assert r.status_code == 200, r.text
    memory = httpx.get(server.url + "/memory").json()
    assert memory["mc"] is True and memory["num_tokens"] > 1000 and memory["cost"] <= memory["budget"] == 64
    levels = {level for level, _, _ in memory["entries"]}
    assert 0 in levels and max(levels) >= 2 and memory["refocuses"] >= 1
    assert memory["entries"][0][1] == 0 and memory["entries"][-1][2] == memory["num_tokens"]


def post(server, payload, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    return httpx.post(
        server.url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"}
    )


@pytest.mark.parametrize(
    "payload, raw, status, words",
    [
        (None, b'{"messages": [', 400, "not valid JSON"),
        ({"model": MODEL, "messages": []}, None, 400, "non-empty list"),
        ({"model": MODEL}, None, 400, "non-empty list"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "alternate"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
            None,
            400,
            "alternate",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": ""}]}, None, 400, "non-empty string"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, None, 400, "non-empty string"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "does not exist"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
            None,
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            None,
            400,
            "temp",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, None, 400, "n=1"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}, None, 413, "limit"),
        ([1, 2], None, 400, "JSON object"),
    ],
)
def test_bad_requests_get_4xx_json_errors(server, payload, raw, status, words):
    r = post(server, payload, raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_get_json_errors(server):
    for r, status in (
        (httpx.get(server.url + "/v1/nothing"), 404),
        (httpx.get(server.url + "/v1/chat/completions"), 405),
    ):
        assert r.status_code == status and "message" in r.json()["error"]
    assert httpx.get(server.url + "/health").json()["idle"] == 2  # no worker leaked by the bad requests


def test_32_concurrent_clients_all_get_complete_correct_replies(server, reference):
    prompts = [[{"role": "user", "content": f"question number {i} about the tree"}] for i in range(32)]
    expected = [expected_reply(reference, m, 20) for m in prompts]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
        body = {
            "model": MODEL,
            "messages": prompts[i],
            "temperature": 0,
            "max_tokens": 20,
            "stream": i % 2 == 0,
        }
        if not body["stream"]:
            r = await client.post("/v1/chat/completions", json=body)
            choice = r.json()["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        text, finish = "", None
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
        return text, finish

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert results == expected
    assert len({text for text, _ in expected}) > 1  # different prompts, different replies: no cross-talk
    assert httpx.get(server.url + "/health").json()["idle"] == 2


def test_plain_model_without_mc_serves_and_refuses_overlong_prompts(reference):
    tok = tiny_tokenizer()
    plain = Worker(tiny_model(tok.get_vocab_size()), tok)
    with LiveServer(create_app([plain], MODEL, max_tokens_cap=64)) as live:
        messages = [{"role": "user", "content": "hello there"}]
        r = httpx.post(
            live.url + "/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 10}
        )
        assert r.status_code == 200 and r.json()["model"] == MODEL
        assert r.json()["choices"][0]["message"]["content"] == expected_reply(plain, messages, 10)[0]
        long = [{"role": "user", "content": "the tree " * 400}]  # > sequence_len 256
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": long, "max_tokens": 10})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.get(live.url + "/memory").json() == {"mc": False}


def test_a_client_leaving_mid_stream_frees_its_worker(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 64,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["idle"] != 2:
        assert time.time() < deadline, "the worker of an abandoned stream was never given back"
        time.sleep(0.05)


@pytest.mark.parametrize("mc", [True, False])  # through a memory session, and plain context
def test_a_tool_call_is_run_and_streamed_as_code_and_output(mc):
    tok = Tokenizer.train_from_iterator(["bytes only"], MIN_VOCAB_SIZE)
    model = tool_model(tok, "6*7")  # its reply is the call; only the sandbox can say 42
    nets = None
    if mc:
        cfg = MCConfig(block_size=8, wc_budget=32, recent=16, horizon=8)
        nets = (cfg, *build_mc_nets(cfg, model.config.n_embd))
    shown = "```python\n6*7\n```\n```output\n42\n```\n"
    with LiveServer(create_app([Worker(model, tok, "cpu", nets)], MODEL, max_tokens_cap=32)) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "six times seven?"}]
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, temperature=0, max_tokens=32
        )
        chunks = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream]
        assert "".join(text for text, _ in chunks) == shown and chunks[-1][1] == "stop"
        full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
        assert full.choices[0].message.content == shown
    # sent back (the API is stateless), the shown reply is read as the call and the output it was
    body = {
        "messages": [*messages, {"role": "assistant", "content": shown}, {"role": "user", "content": "ok"}]
    }
    req = parse_chat_request(body, MODEL, 32, {"max_tokens": 8, "temperature": 0.0, "top_k": None})
    ids = tok.render_for_completion(req["conversation"])
    s = tok.encode_special
    call = [s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
    call += [s("<|output_start|>"), *tok.encode("42"), s("<|output_end|>"), s("<|assistant_end|>")]
    assert any(ids[i : i + len(call)] == call for i in range(len(ids)))


def test_a_100k_token_paste_streams_its_progress_while_the_server_answers_others():
    """The paste's first chunk is read, then its worker is held (a gate the test opens): meanwhile the
    server answers /health and a whole chat on the other worker. Then the paste goes on, its progress
    arrives as SSE comments (the openai client ignores them), and the reply follows."""
    # The panel check below needs a refocus that expands something. The tiny random lens rates the raw tail's
    # blocks alike, and with flank (each keeps its neighbours' scores) no refocus after this paste edits at all.
    reference = mc_worker(flank=False)
    gate = threading.Event()

    class HeldWorker(Worker):
        def generate(self, ids, *args, on_progress=None, **kw):
            def held(done: int, total: int) -> None:
                on_progress(done, total)
                if done < total:
                    assert gate.wait(120), "the test never opened the gate"

            return super().generate(ids, *args, on_progress=held, **kw)

    rng = random.Random(0)
    paste = "The code is 4711. " + " ".join(rng.choice(WORDS) for _ in range(100_000))
    paste_messages = [{"role": "user", "content": paste}]
    total = len(reference.tokenizer.render_for_completion({"messages": paste_messages}))
    assert total >= 100_000
    held = HeldWorker(reference.model, reference.tokenizer, "cpu", reference.mc)
    app = create_app([held, mc_worker(flank=False)], MODEL, max_body_bytes=4 << 20, max_tokens_cap=64)
    body = {"model": MODEL, "messages": paste_messages, "stream": True, "temperature": 0, "max_tokens": 8}
    progress, text = [], ""
    try:
        with LiveServer(app) as live:
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith(": ingest "):
                        progress.append(json.loads(line[len(": ingest ") :]))
                        break
                assert progress and progress[0]["done"] < progress[0]["total"] == total  # held mid-paste
                assert httpx.get(live.url + "/health", timeout=30).json()["idle"] == 1
                short = [{"role": "user", "content": "a short question about the tree"}]
                answer = httpx.post(
                    live.url + "/v1/chat/completions",
                    json={"messages": short, "temperature": 0, "max_tokens": 12},
                    timeout=60,
                )
                assert (
                    answer.json()["choices"][0]["message"]["content"]
                    == expected_reply(reference, short, 12)[0]
                )
                gate.set()
                for line in lines:
                    if line.startswith(": ingest "):
                        progress.append(json.loads(line[len(": ingest ") :]))
                    elif line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            memory = httpx.get(live.url + "/memory").json()
    finally:
        gate.set()
    done = [p["done"] for p in progress]
    assert len(done) >= 12 and done == sorted(set(done)) and done[-1] == total
    assert text == expected_reply(reference, paste_messages, 8)[0]
    assert memory["num_tokens"] >= total and memory["cost"] <= memory["budget"]
    # the panel's "zoomed" list: each span the last refocus expanded, with the start of its text
    ids = reference.tokenizer.render_for_completion({"messages": paste_messages})
    expanded = [e for e in memory["last_edits"] if e["kind"] == "expand"]
    assert expanded and [(z["start"], z["end"]) for z in memory["zoomed"]] == [
        (e["start"], e["end"]) for e in expanded
    ]
    for z in memory["zoomed"]:
        if z["start"] + 96 <= total:
            excerpt = ReplyText(reference.tokenizer).render(ids[z["start"] : min(z["end"], z["start"] + 96)])
            assert z["text"] == excerpt + ("…" if z["end"] - z["start"] > 96 else "")


def test_a_client_leaving_mid_paste_stops_the_reading_and_frees_the_worker(reference):
    gate, calls, callbacks = threading.Event(), [], []

    class HeldWorker(Worker):
        def generate(self, ids, *args, on_progress=None, **kw):
            callbacks.append(on_progress)

            def held(done: int, total: int) -> None:
                on_progress(done, total)  # raises once the request is cancelled
                calls.append(done)
                if len(calls) == 1:
                    assert gate.wait(120), "the test never opened the gate"

            return super().generate(ids, *args, on_progress=held, **kw)

    paste = " ".join(random.Random(1).choice(WORDS) for _ in range(30_000))  # four ingest chunks
    held = HeldWorker(reference.model, reference.tokenizer, "cpu", reference.mc)
    body = {"model": MODEL, "messages": [{"role": "user", "content": paste}], "stream": True, "max_tokens": 8}
    try:
        with LiveServer(create_app([held], MODEL, max_body_bytes=1 << 20, max_tokens_cap=64)) as live:
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith(": ingest "):
                        break  # leave after the first progress report
            deadline = time.time() + 30
            while True:  # the server notices the client left: the progress callback now refuses to go on
                try:
                    callbacks[0](0, 1)
                except Exception as e:
                    assert type(e).__name__ == "Cancelled"
                    break
                assert time.time() < deadline, "the request was never cancelled"
                time.sleep(0.05)
            gate.set()
            while httpx.get(live.url + "/health").json()["idle"] != 1:
                assert time.time() < deadline, "the worker of an abandoned paste was never given back"
                time.sleep(0.05)
    finally:
        gate.set()
    assert calls == [8192]  # the next chunk's report refused: the rest of the paste was never read
