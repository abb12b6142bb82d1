"""The whole app from a real browser: headless Chromium speaks into the Microphone over WebRTC
(a fake capture device playing real speech, then silence) and types into the text box; the page
must explain itself (one click to start, the user's clip, each reply's mode, the language picker
only when transcribing) and keep the console quiet. One browser for the module: each launch costs
20-40 s on a shared machine."""

import io
import os
import re
import time
import wave
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import app_options

from voxtral_app.audio.pcm import SAMPLE_RATE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"  # Debian's package; CI installs it (no `playwright install`)
CHROMIUM_ARGS = [
    "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
    "--use-fake-device-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # with no network these make chromium hang
    "--disable-component-update",
    "--disable-sync",
]
SPEECH_S = 4.0  # of SPEECH_WAV, then
SILENCE_S = 40.0  # of silence (chromium loops the file): one spoken turn, the next only 44 s later
REPLY_TIMEOUT_MS = 90_000  # to the first reply text; ~5 s on CPU
REPLY_DONE_TIMEOUT_MS = 15_000  # then to the turn's last update
EXPECT_TIMEOUT_MS = 20_000  # for each page change (playwright's 5 s is short on a shared 2-core machine)
CONSOLE_LINES_MAX = 10  # without --debug; fastrtc alone logs ~440 lines in 30 s of talking
# gradio's page template loads this (async) for Hugging Face's Space iframe; offline it fails harmlessly
IFRAME_RESIZER = "https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/4.3.1/iframeResizer.contentWindow.min.js"
VIEWPORT = {"width": 1200, "height": 860}
# README_SCREENSHOTS=assets pytest tests/test_browser.py: also refresh the README's screenshots
README_SCREENSHOTS = os.environ.get("README_SCREENSHOTS")


def write_fake_mic(path: str, speech: np.ndarray) -> str:
    """16-bit PCM mono WAV at 16 kHz: speech then silence."""
    audio = np.concatenate([speech[: int(SPEECH_S * SAMPLE_RATE)], np.zeros(int(SILENCE_S * SAMPLE_RATE), np.float32)])
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def active_sessions(server) -> int:
    return httpx.get(f"{server.url}/health").json()["active_sessions"]


def wait_for_sessions(server, at_most: int, timeout_s: float = 45.0) -> int:  # a closed tab: ~30 s
    deadline = time.monotonic() + timeout_s
    while (n := active_sessions(server)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> str:
    """Where the pages' screenshots go (each test prints their paths)."""
    return str(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def browser(live_server, tmp_path_factory, speech):
    """Chromium whose microphone plays speech; closing it waits for the server to drop its connections
    (a reply still decoding on the engine's daemon thread at interpreter exit aborts the process)."""
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    wav = write_fake_mic(str(tmp_path_factory.mktemp("browser") / "fake-mic.wav"), speech)
    sessions = active_sessions(live_server)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        yield browser
        browser.close()
    wait_for_sessions(live_server, sessions)


class Page:
    """A page of the app, its components found by their labels, with what it printed and fetched."""

    def __init__(self, browser, server, screenshots: str, path: str = "/"):
        from playwright.sync_api import expect

        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        self.page = browser.new_page(viewport=VIEWPORT)
        self.screenshots = screenshots  # a directory
        self.console: list[str] = []
        self.elsewhere: list[str] = []  # requests that left the server (a CDN: not offline)
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        local = urlsplit(server.url).netloc
        self.page.on("request", lambda request: None if urlsplit(request.url).netloc in (local, "")
                     or request.url.startswith(("data:", "blob:")) else self.elsewhere.append(request.url))
        self.page.goto(server.url + path)

    def block(self, label: str):
        page = self.page
        return page.locator(".block").filter(has=page.get_by_test_id("block-label").filter(has_text=label))

    def bot(self, nth: int):
        return self.page.locator("#conversation").get_by_test_id("bot").nth(nth)

    def expect_reply(self, nth: int, title: str):
        """The nth reply has text and, once finished, its title (mode and latency)."""
        from playwright.sync_api import expect

        reply = self.bot(nth)
        expect(reply.locator(".message-content").first).to_have_text(re.compile(r"\S"), timeout=REPLY_TIMEOUT_MS)
        expect(reply).to_contain_text(re.compile(title + r" · ⏱ \d+ ms to first token"),
                                      timeout=REPLY_DONE_TIMEOUT_MS)
        return reply

    def prompt_tokens(self) -> tuple[int, int]:
        """The last turn's (new, cached) prompt tokens, from the turn line under the chat."""
        line = self.page.get_by_text(re.compile(r"\d+ new / \d+ cached prompt tokens")).inner_text()
        new, cached = re.search(r"(\d+) new / (\d+) cached", line).groups()
        return int(new), int(cached)

    def type(self, text: str) -> None:
        box = self.page.locator("#typed textarea")
        box.fill(text)
        box.press("Enter")

    def screenshot(self, name: str, readme: bool = False) -> str:
        path = os.path.join(self.screenshots, name)
        self.page.screenshot(path=path)
        if readme and README_SCREENSHOTS:
            save_small_png(path, os.path.join(README_SCREENSHOTS, name))
        return path


def save_small_png(source: str, target: str) -> None:
    from PIL import Image

    with Image.open(source) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    with open(target, "wb") as out:
        out.write(buffer.getvalue())


def test_one_click_transcribes_then_typed_turns_join_the_call(live_server, browser, screenshots):
    """Transcribe + English chosen before starting; one click; the first spoken turn comes back as a
    transcript with the user's clip; then typed turns join the microphone's conversation, and both
    clear buttons forget it, on the page and on the server."""
    from playwright.sync_api import expect

    started = time.perf_counter()
    sessions_before = active_sessions(live_server)
    app = Page(browser, live_server, screenshots)
    page, microphone, language = app.page, app.block("Microphone"), app.page.locator("#language")
    chat, clicks, shots = page.locator("#conversation"), 0, []
    try:
        expect(page.get_by_text(re.compile(r"Ready: .+ on cpu"))).to_be_visible()  # ui.engine_status
        expect(language).to_be_hidden()  # chat mode: no language to pick
        page.locator("#mode").get_by_text("transcribe", exact=True).click()
        expect(language).to_be_visible()
        language.locator("input").click()
        page.get_by_role("option", name="en", exact=True).click()
        expect(language.locator("input")).to_have_value("en")

        microphone.get_by_role("button", name="Start talking").click()  # the only click to start talking
        clicks += 1
        # the handler asked the page for its controls at start-up (send_input): the first turn is transcribed
        expect(chat.get_by_test_id("bot").first.locator(".message-content").first).to_have_text(
            re.compile(r"\S"), timeout=REPLY_TIMEOUT_MS)
        user = chat.get_by_test_id("user").first
        expect(user.locator("#duration")).to_have_text(re.compile(r"0:0[1-4]"))  # the clip's player has loaded it
        chat.evaluate("chat => chat.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")  # to the clip
        shots.append(app.screenshot("page-light.png", readme=True))  # mid-conversation: the transcript starts
        page.emulate_media(color_scheme="dark")  # gradio follows the system's scheme
        expect(page.locator("body.dark, .dark").first).to_be_attached()
        page.wait_for_timeout(1000)  # the theme's transitions
        chat.evaluate("chat => chat.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")
        shots.append(app.screenshot("page-dark.png", readme=True))
        page.emulate_media(color_scheme="light")
        expect(page.get_by_text(re.compile(r"📝 Transcript \(en\): \d+ ms from end of speech"))).to_be_visible()
        expect(user.locator("audio").first).to_be_attached()  # the user's turn is a playable clip
        src = user.locator("a.download-link").get_attribute("href")  # what the player plays
        clip = httpx.get(src if src.startswith("http") else live_server.url + src)
        assert clip.status_code == 200 and clip.content[:4] == b"RIFF"
        with wave.open(io.BytesIO(clip.content)) as played:
            rate, said_s = played.getframerate(), played.getnframes() / played.getframerate()
        assert rate == SAMPLE_RATE and 1.0 < said_s <= SPEECH_S + 0.5

        # "Clear conversation" forgets the turn (and stops the transcript, if the random model is still at it)
        page.get_by_role("button", name="Clear conversation").click()
        expect(chat.get_by_test_id("bot")).to_have_count(0)
        page.locator("#mode").get_by_text("chat", exact=True).click()
        expect(language).to_be_hidden()
        prompts = []  # (new, cached) prompt tokens of each typed turn
        for n, text in enumerate(["Hello! What can you do?", "And then?"]):
            app.type(text)
            app.expect_reply(n, re.escape("💬 Reply"))
            expect(page.locator("#typed textarea")).to_have_value("")
            expect(chat.get_by_test_id("user")).to_have_count(n + 1)  # the spoken turn stayed cleared
            expect(chat.get_by_test_id("user").nth(n)).to_have_text(text)
            prompts.append(app.prompt_tokens())
        assert active_sessions(live_server) == sessions_before + 1  # typed into the call, not a second slot
        assert prompts[1][1] >= sum(prompts[0]), prompts  # the second turn reused the first one's KV cache

        chat.get_by_role("button", name="Clear").click()  # the chat's trash icon: the same as the button
        expect(chat.get_by_test_id("bot")).to_have_count(0)
        app.type("Hi.")
        app.expect_reply(0, re.escape("💬 Reply"))
        expect(chat.get_by_test_id("user")).to_have_count(1)
        assert app.prompt_tokens()[1] == prompts[0][1], prompts  # as fresh as after the first clear

        assert len(app.console) <= CONSOLE_LINES_MAX, "\n".join(app.console)
        assert set(app.elsewhere) <= {IFRAME_RESIZER}, app.elsewhere  # works offline: nothing from a CDN
    finally:
        print(f"\nscreenshot: {app.screenshot('browser-reply.png')}")
        print(f"console lines: {len(app.console)}: {app.console}")
        print(f"requests elsewhere: {app.elsewhere}")

    microphone.get_by_role("button", name="start stream").filter(has_text="Stop").click()
    assert wait_for_sessions(live_server, sessions_before) <= sessions_before, "Stop left the connection open"
    print(f"clicks to talk: {clicks}; {time.perf_counter() - started:.1f} s; screenshots: {shots}")


def test_typing_without_a_microphone_and_the_api_page(live_server, browser, screenshots, monkeypatch):
    """Without a microphone connection the text box uses the page's own conversation; the API page
    loads nothing from outside, and FastAPI's CDN-backed /docs is off."""
    from playwright.sync_api import expect

    monkeypatch.setenv("GRADIO_IS_E2E_TEST", "1")  # gradio's heartbeat every 0.25 s, not 15 s: a closed tab's
    # unload runs at once
    sessions_before = active_sessions(live_server)
    app = Page(browser, live_server, screenshots)
    closed_tab_freed = None
    try:
        expect(app.page.get_by_text(re.compile(r"Ready: .+ on cpu"))).to_be_visible()
        app.type("Hello there.")
        app.expect_reply(0, re.escape("💬 Reply"))
        expect(app.page.locator("#typed textarea")).to_have_value("")
        assert len(app.console) <= CONSOLE_LINES_MAX, app.console
        assert active_sessions(live_server) == sessions_before + 1  # the page's own conversation
    finally:
        app.screenshot("browser-typed.png")
        app.page.close()
        closed_tab_freed = wait_for_sessions(live_server, sessions_before, timeout_s=20) <= sessions_before
        uploads = live_server.app.state.ui.uploads  # later tests share this engine: never leave a slot behind
        for session in list(uploads.conversations):
            uploads.close(session)
        wait_for_sessions(live_server, sessions_before)
    assert closed_tab_freed, "closing the tab did not give its conversation's slot back (the page's unload)"
    monkeypatch.delenv("GRADIO_IS_E2E_TEST")  # the API page must go network-idle
    api = Page(browser, live_server, screenshots, "/?view=api")
    expect(api.page.get_by_text(re.compile(r"API", re.I)).first).to_be_visible()
    api.page.wait_for_load_state("load")  # not "networkidle": the heartbeat stream stays open
    api.page.wait_for_timeout(2000)
    api.screenshot("browser-api.png")
    assert set(app.elsewhere + api.elsewhere) <= {IFRAME_RESIZER}, app.elsewhere + api.elsewhere
    assert httpx.get(f"{live_server.url}/docs").status_code == 404
    assert httpx.get(f"{live_server.url}/openapi.json").status_code == 200


def test_the_console_is_quiet_unless_debug(app_engine):
    """--debug (app.py passes it as ServerOptions.debug) keeps fastrtc's console chatter; otherwise the page
    silences console.log/debug/info. Both pages load no remote sound."""
    from voxtral_app.serving.app import ServerOptions, create_app
    from voxtral_app.serving.ui import OFFLINE, QUIET_CONSOLE

    quiet, chatty = (create_app(app_engine, app_options(app_engine), options=ServerOptions(debug=debug)).state.ui
                     for debug in (False, True))
    assert QUIET_CONSOLE in quiet.head and QUIET_CONSOLE not in chatty.head
    assert OFFLINE in quiet.head and OFFLINE in chatty.head
