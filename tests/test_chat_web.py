"""chat_web: the OpenAI client against a live localhost server, bad requests, 32 concurrent clients, the page."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from test_session import tiny_cfg, tiny_model, tiny_nets, tiny_tokenizer

from scripts.chat_web import Worker, create_app

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


def mc_worker() -> Worker:
    tok = tiny_tokenizer()
    cfg = tiny_cfg()
    gistnet, lensnet = tiny_nets(cfg)
    return Worker(tiny_model(tok.get_vocab_size()), tok, "cpu", (cfg, gistnet, lensnet))


def expected_reply(worker: Worker, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """The greedy reply, computed directly (no server), and its finish reason."""
    ids = worker.tokenizer.render_for_completion({"messages": messages})
    out, finish = [], "length"
    for token in worker.generate(ids, max_tokens, 0.0, None, 0):
        if token in worker.engine.stop_tokens:
            finish = "stop"
            break
        out.append(token)
    return worker.tokenizer.decode(out), finish


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
