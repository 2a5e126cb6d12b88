"""The chat page in a real browser: headless Chromium (the Debian package) driven by Playwright types a message, sees
the reply stream in, presses Stop (which frees the server's slot), keeps the conversation, and shows errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from serving import API_KEY, Running, serving, tiny_checkpoint

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install -e .[test]")
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no Chromium for the browser test: install it with "
                       "`sudo apt-get install chromium` (Debian/Ubuntu), or point LMFORGE_CHROMIUM at a Chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Running:
    with serving(tiny_checkpoint(tmp_path_factory.mktemp("browser") / "tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def page(server: Running):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(10_000)
        yield page
        browser.close()


def test_type_see_the_reply_stream_and_stop_it(server: Running, page) -> None:
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(server.url)
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    page.fill("#system", "You are terse.")
    server.step_delay(0.03)  # the reply takes about 1.5 s: time to see it arrive and stop it
    page.fill("#input", "the king rode to the castle")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0")
    assert page.get_attribute(".msg.assistant", "data-state") == "streaming"
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert server.wait_idle(timeout=0.5) < 0.5  # stopping the fetch freed the slot
    partial = page.inner_text(".msg.assistant")
    assert page.is_enabled("#send")

    server.step_delay(0.0)
    page.fill("#max-tokens", "5")
    page.fill("#input", "and then?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert sent[-1]["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "the king rode to the castle"},
        {"role": "assistant", "content": partial}, {"role": "user", "content": "and then?"}]
    assert sent[-1]["max_tokens"] == 5 and sent[-1]["stream"] is True


def test_errors_are_shown(server: Running, page) -> None:
    page.goto(server.url)  # the key typed before is remembered
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    assert page.input_value("#api-key") == API_KEY
    page.fill("#max-tokens", "100000")
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    error = page.wait_for_selector(".msg.error >> text=max_tokens=100000")
    assert "context" in error.inner_text()
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.fill("#max-tokens", "2")
    page.fill("#input", "hello again")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert [m["content"] for m in sent[-1]["messages"]] == ["hello again"]  # the failed turn is not history
    page.fill("#api-key", "sk-wrong")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector(".msg.error >> text=Incorrect or missing API key")
