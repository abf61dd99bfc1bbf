"""The chat page in a real browser (headless Chromium via Playwright): type a message, see the reply stream in
and the memory panel draw the working context; a screenshot is saved under the test's tmp dir.

Playwright cannot download its own browser here, so it drives Debian's chromium (/usr/bin/chromium, which
.ci/run installs when missing). This test is never skipped: a missing browser is a failure.
"""

from __future__ import annotations

import torch
from playwright.sync_api import sync_playwright
from test_chat_web import MODEL, LiveServer, expected_reply, mc_worker

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
