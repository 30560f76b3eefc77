"""The web chat page at / in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python API),
against a real ``llama3 serve`` process with an API key.

What a user does: open the page, give the key when asked, send a message and watch the answer stream in,
stop a long answer, regenerate, reload and find the conversation still there. Oracles: the page's DOM, the
server's own non-streaming answer to the same request, and a canary that any executed markup would set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_server import KEY, running_server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (README test command)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max-seq-len", "1024", "--max-batch-size", "2", "--api-key", KEY, "--threads", "2",
            "--log-level", "warning", "--model-name", "smollm2"]
    with running_server(args, tmp_path_factory, "web") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start; containers often have a tiny
        # /dev/shm, which crashes Chromium's renderers unless it writes to /tmp instead.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant").all_inner_texts()


def test_chat_page_streams_stops_and_keeps_history(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    asked = []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2'", timeout=30_000)
    assert len(asked) == 1 and "API key" in asked[0]  # asked once, then remembered

    page.click("#toggle-settings")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#system", "You are a concise assistant.")
    page.click("#toggle-settings")
    canary = 'Reply to <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> please'
    page.fill("#input", canary)
    page.keyboard.press("Enter")
    # The answer appears while it streams (the cursor class), then settles.
    page.wait_for_selector(".msg.assistant.streaming", timeout=30_000)
    page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 0",
                           timeout=60_000)
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=120_000)
    first = assistant_texts(page)
    assert len(first) == 1 and first[0].strip()
    assert page.locator(".msg.user").first.inner_text() == canary  # shown as text, not markup
    assert page.evaluate("window.__pwned") is None
    assert "tok/s" in page.inner_text("#speed")

    # Stop: a long answer is cut when the user presses Stop, and what came so far is kept.
    page.click("#toggle-settings")
    page.fill("#max-tokens", "600")  # greedy still: the same long answer on every run
    page.click("#toggle-settings")
    page.fill("#input", "Write a long story about a lighthouse keeper.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 20",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=10_000)
    stopped = assistant_texts(page)[-1]
    time.sleep(1.0)
    assert assistant_texts(page)[-1] == stopped and len(stopped) > 20
    assert page.is_visible("#send") and page.is_hidden("#stop")

    # Regenerate replaces the last answer.
    page.click("#regenerate")
    page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 0",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=10_000)
    assert len(assistant_texts(page)) == 2

    # Reload: the conversation and the settings come back from the browser's storage; the key is not asked again.
    before = page.locator(".msg").all_inner_texts()
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2'", timeout=30_000)
    assert page.locator(".msg").all_inner_texts() == before and len(asked) == 1
    assert "tok/s" in page.inner_text("#speed")
    assert page.input_value("#system") == "You are a concise assistant."
    shot = page.screenshot()
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("LLAMA3_WEB_SCREENSHOT"):  # the README's picture: LLAMA3_WEB_SCREENSHOT=docs/web-chat.png
        Path(os.environ["LLAMA3_WEB_SCREENSHOT"]).write_bytes(shot)

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.close()


def test_markdown_is_rendered_and_never_executed(server, browser):
    page = browser.new_page()
    page.goto(server + "/")
    made = page.evaluate("""() => {
        const box = document.createElement('div');
        box.appendChild(renderMarkdown(
            '# Title\\nSome **bold**, *it*, `x<y` and [a link](https://example.com) [bad](javascript:alert(1))\\n' +
            '- one\\n- <b>two</b>\\n\\n```python\\nprint("<script>window.__pwned=3</script>")\\n```\\n' +
            '<img src=x onerror="window.__pwned=4">'));
        document.body.appendChild(box);
        return {
            html: box.innerHTML, strong: box.querySelectorAll('strong').length, em: box.querySelectorAll('em').length,
            code: box.querySelector('pre code').textContent, links: [...box.querySelectorAll('a')].map(a => a.href),
            items: box.querySelectorAll('li').length, scripts: box.querySelectorAll('script, img, b').length,
        };
    }""")
    assert made["strong"] == 1 and made["em"] == 1 and made["items"] == 2
    assert made["code"] == 'print("<script>window.__pwned=3</script>")'
    assert made["links"] == ["https://example.com/"] and made["scripts"] == 0
    assert page.evaluate("window.__pwned") is None
    page.close()
