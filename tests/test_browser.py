"""The chat page in a real browser (headless Chromium via Playwright): type a message, see the reply stream in
and the memory panel draw the working context; a screenshot is saved under the test's tmp dir.

Playwright cannot download its own browser here, so it drives Debian's chromium (/usr/bin/chromium, which
.ci/run installs when missing). This test is never skipped: a missing browser is a failure.
"""

from __future__ import annotations

import random

import httpx
import torch
from playwright.sync_api import sync_playwright
from test_chat_cli import tool_model
from test_chat_web import MODEL, LiveServer, expected_reply, mc_worker
from test_session import WORDS

from nanochat.chat_worker import Worker
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer
from scripts.chat_web import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_browser_chat_streams_a_reply_and_draws_the_memory_panel(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker, reference = mc_worker(), mc_worker()
    message = " ".join(["the lens decides which old turns to zoom into again"] * 30)  # ~300 tokens > W_max 64
    expected, _ = expected_reply(reference, [{"role": "user", "content": message}], 24)
    try:
        with LiveServer(create_app([worker], MODEL, max_tokens_cap=64)) as live, sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                viewport={"width": 1280, "height": 800},
            )
            try:
                page = browser.new_page()
                page.goto(live.url + "/")
                page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
                assert page.text_content("#model-name") == MODEL
                page.fill("#temperature", "0")
                page.fill("#max-tokens", "24")
                # count how many times the reply's text changes while it streams in
                page.evaluate(
                    """() => { window.updates = 0; new MutationObserver(() => window.updates++).observe(
                        document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }"""
                )
                page.fill("#input", message)
                page.press("#input", "Enter")
                reply = page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
                assert reply.text_content() == expected and len(expected) > 0
                assert page.evaluate("window.updates") >= 4  # user bubble, empty reply, then several deltas
                assert page.text_content(".msg.user") == message
                page.wait_for_function("document.querySelectorAll('#timeline rect').length > 1")
                stats = page.text_content("#memory-stats")
                assert "tokens in the tree" in stats and "/64" in stats
                levels = page.eval_on_selector_all("#slots rect", "rs => rs.map(r => +r.dataset.level)")
                assert 0 in levels and max(levels) >= 1  # raw recent text and gists of the old part
                assert page.text_content("#memory-map").startswith("[L")
                shot = tmp_path / "chat.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                browser.close()
    finally:
        torch.set_num_threads(threads)


def launch(p, tmp_path):
    return p.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=CHROMIUM,
        headless=True,
        args=ARGS,
        viewport={"width": 1280, "height": 900},
    )


def test_browser_long_paste_several_turns_then_the_memory_panel_shows_the_zoom(tmp_path):
    """Paste a long document with a code early in it (more than two ingest chunks, so its reading progress
    shows), chat on, ask for the code. Every reply comes through the streaming OpenAI endpoint and equals the
    session's own greedy reply; the panel then lists raw and gisted spans and what the last refocus zoomed
    into, with the zoomed text. The tiny untrained model here is about the page, not about recall (recall is
    measured by mc_eval and chat_eval)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker, reference = mc_worker(), mc_worker()
    rng = random.Random(0)
    document = "The code is 4711. " + " ".join(rng.choice(WORDS) for _ in range(20_000))
    turns = [f"Please keep this document: {document}", "What is the document about?", "What was the code?"]
    try:
        with LiveServer(create_app([worker], MODEL, max_body_bytes=1 << 20, max_tokens_cap=64)) as live:
            with sync_playwright() as p:
                browser = launch(p, tmp_path)
                try:
                    page = browser.new_page()
                    posts = []
                    page.on(
                        "request",
                        lambda r: (
                            posts.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
                        ),
                    )
                    page.goto(live.url + "/")
                    page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
                    page.fill("#temperature", "0")
                    page.fill("#max-tokens", "12")
                    page.evaluate(  # every reading-progress value the first reply's bubble shows
                        """() => { window.ingested = []; new MutationObserver((ms) => { for (const m of ms)
                          if (m.attributeName === 'data-ingested') window.ingested.push(+m.target.dataset.ingested);
                        }).observe(document.getElementById('messages'), {subtree: true, attributes: true}); }"""
                    )
                    messages = []
                    for i, text in enumerate(turns):
                        page.fill("#input", text)
                        page.press("#input", "Enter")
                        page.wait_for_selector(
                            f".msg.assistant:nth-of-type({2 * i + 2})[data-done='1']", timeout=120_000
                        )
                        messages.append({"role": "user", "content": text})
                        expected, _ = expected_reply(reference, messages, 12)
                        shown = page.eval_on_selector_all(
                            ".msg.assistant", "els => els.map(e => e.textContent)"
                        )
                        assert shown[i] == expected and expected
                        messages.append({"role": "assistant", "content": expected})
                    assert [len(b["messages"]) for b in posts] == [1, 3, 5] and all(
                        b["stream"] for b in posts
                    )
                    total = len(reference.tokenizer.render_for_completion({"messages": messages[:1]}))
                    seen = page.evaluate("window.ingested")
                    assert (
                        total > 2 * 8192 and seen[0] == 8192 and seen.index(total) >= 2
                    )  # grew chunk by chunk
                    # the panel: raw and gisted spans tile the history; the zoom is drawn and its text shown
                    memory = httpx.get(live.url + "/memory").json()
                    page.wait_for_function(
                        "document.querySelectorAll('#memory-spans li[data-kind]').length > 1"
                    )
                    spans = page.eval_on_selector_all(
                        "#memory-spans li",
                        "ls => ls.map(l => [l.dataset.kind, +l.dataset.start, +l.dataset.end])",
                    )
                    assert spans[0][1] == 0 and spans[-1] == ["raw", spans[-1][1], memory["num_tokens"]]
                    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:])) and {"raw", "gist"} <= {
                        s[0] for s in spans
                    }
                    assert memory["zoomed"], "the last refocus of this conversation expands a gist"
                    zooms = page.eval_on_selector_all(
                        "#memory-zoom .zoom", "zs => zs.map(z => [+z.dataset.start, +z.dataset.end])"
                    )
                    assert zooms == [[z["start"], z["end"]] for z in memory["zoomed"]]
                    quotes = page.eval_on_selector_all(
                        "#memory-zoom blockquote", "qs => qs.map(q => q.textContent)"
                    )
                    assert quotes == [z["text"] for z in memory["zoomed"]] and all(quotes)
                    assert page.locator("#timeline rect.zoomed").count() == len(zooms)
                    shot = tmp_path / "long_paste.png"
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.stat().st_size > 10_000
                finally:
                    browser.close()
    finally:
        torch.set_num_threads(threads)


def test_browser_shows_a_tool_call_as_code_and_its_output(tmp_path):
    tok = Tokenizer.train_from_iterator(["bytes only"], MIN_VOCAB_SIZE)
    worker = Worker(tool_model(tok, "6*7"), tok)  # its reply is the python call; the sandbox answers 42
    with LiveServer(create_app([worker], MODEL, max_tokens_cap=32)) as live, sync_playwright() as p:
        browser = launch(p, tmp_path)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "32")
            page.fill("#input", "six times seven?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            assert page.text_content(".msg.assistant pre.code") == "6*7"
            assert page.text_content(".msg.assistant pre.output") == "42"
            assert "<|" not in page.text_content(".msg.assistant") and "```" not in page.text_content(
                ".msg.assistant"
            )
            page.screenshot(path=str(tmp_path / "tool_call.png"))
        finally:
            browser.close()
