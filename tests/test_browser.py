"""The whole app from a real browser: headless Chromium speaks into the Microphone over WebRTC
(a fake capture device playing real speech, then silence), types into the text box and uploads a
file; the page must behave as a voice product (one click to start, a state that follows the voice
loop, a level meter, replies that read as messages, one conversation per page across Stop and
Start, endings in words, a phone layout) and keep the console quiet. One browser and one server
for the module: each launch costs 20-40 s on a shared machine."""

import io
import os
import re
import shutil
import time
import wave
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import app_options, write_wav
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package (no `playwright install`)
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
    "--autoplay-policy=no-user-gesture-required",  # the level meter's AudioContext runs without a gesture
]
LEAD_S = 1.5  # of silence first (the page shows `listening` before `hearing you`), then
SPEECH_S = 4.0  # of SPEECH_WAV, then
SILENCE_S = 120.0  # of silence (chromium loops the file): one spoken turn, the next ~2 minutes later
REPLY_TIMEOUT_MS = 90_000  # to the first reply text; ~5 s on CPU
REPLY_DONE_TIMEOUT_MS = 15_000  # then to the turn's last update
EXPECT_TIMEOUT_MS = 20_000  # for each page change (playwright's 5 s is short on a shared 2-core machine)
CONSOLE_LINES_MAX = 10  # without --debug; fastrtc alone logs ~440 lines in 30 s of talking
# gradio's page template loads this (async) for Hugging Face's Space iframe; offline it fails harmlessly
IFRAME_RESIZER = "https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/4.3.1/iframeResizer.contentWindow.min.js"
VIEWPORT = {"width": 1200, "height": 860}
PHONE = {"width": 390, "height": 844}
TIME_LIMIT_S = 900.0  # the page server's call limit; the test moves the handler's clock past it
# README_SCREENSHOTS=assets pytest tests/test_browser.py: also refresh the README's screenshots
README_SCREENSHOTS = os.environ.get("README_SCREENSHOTS")


def write_fake_mic(path: str, speech: np.ndarray) -> str:
    """16-bit PCM mono WAV at 16 kHz: silence, speech, silence."""
    write_wav(path, np.concatenate([np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32),
                                    speech[: int(SPEECH_S * SAMPLE_RATE)],
                                    np.zeros(int(SILENCE_S * SAMPLE_RATE), np.float32)]))
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


class Skewed:
    """A monotonic clock the test can move forward (the handler's, for its time limit)."""

    def __init__(self):
        self.skew_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew_s


@pytest.fixture(scope="module")
def clock() -> Skewed:
    return Skewed()


@pytest.fixture(scope="module")
def page_server(app_engine, clock):
    """The app as app.py serves it (text replies: no speech to wait for), its handler on `clock`."""
    from voxtral_app.serving.app import ServerOptions, create_app
    from voxtral_app.serving.handler import VoxtralHandler

    options = app_options(app_engine, reply_tokens=48, captions=True)  # short replies keep the tests quick
    server = BackgroundServer(create_app(app_engine, options, ServerOptions(session_time_limit_s=TIME_LIMIT_S),
                                         speaker=None, handler=VoxtralHandler(app_engine, options, clock=clock)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(page_server, tmp_path_factory, speech):
    """Chromium whose microphone plays speech; closing it waits for the server to drop its connections
    (a reply still decoding on the engine's daemon thread at interpreter exit aborts the process)."""
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    wav = write_fake_mic(str(tmp_path_factory.mktemp("browser") / "fake-mic.wav"), speech)
    sessions = active_sessions(page_server)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        yield browser
        browser.close()
    wait_for_sessions(page_server, sessions)


class Page:
    """A page of the app, its components found by their labels, with what it printed and fetched."""

    def __init__(self, browser, server, screenshots: str, path: str = "/", viewport: dict = VIEWPORT):
        from playwright.sync_api import expect

        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        self.page = browser.new_page(viewport=viewport)
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
        bots = self.page.locator("#conversation").get_by_test_id("bot")
        return bots.last if nth == -1 else bots.nth(nth)

    def expect_reply(self, nth: int, kind: str, after: str):
        """The nth reply (-1: the last) has text and, once finished, its footer: its kind and how fast
        it came (`after`: a pattern)."""
        from playwright.sync_api import expect

        reply = self.bot(nth)
        expect(reply.locator(".message-content").first).to_have_text(re.compile(r"\S"), timeout=REPLY_TIMEOUT_MS)
        expect(reply.locator("sub")).to_have_text(re.compile(re.escape(kind) + r" · answered \d+ ms after "
                                                             + after + r" · [\d.]+ tok/s"),
                                                  timeout=REPLY_DONE_TIMEOUT_MS)
        return reply

    def reused_tokens(self) -> tuple[int, int]:
        """The last reply's (reused, all) prompt tokens, from the details line under the settings."""
        line = self.page.locator("#last-turn").inner_text()
        reused, total = re.search(r"(\d+) of (\d+) prompt tokens reused", line).groups()
        return int(reused), int(total)

    def record_states(self) -> None:
        """From now on, window.states lists each voice state the page shows, and window.loudest the
        level meter's highest reading."""
        self.page.evaluate("""() => {
          window.states = []; window.loudest = 0;
          const note = () => {
            const words = document.querySelector("#voice-state .words");
            const state = words && words.textContent;
            if (state && state !== window.states[window.states.length - 1]) window.states.push(state);
          };
          new MutationObserver(note).observe(document.getElementById("voice-state"),
                                             {childList: true, subtree: true, characterData: true});
          note();
          setInterval(() => {
            const meter = document.querySelector("#voice-meter .meter");
            window.loudest = Math.max(window.loudest, Number(meter.getAttribute("aria-valuenow")));
          }, 20);
        }""")

    def states(self) -> list[str]:
        return self.page.evaluate("window.states")

    def unnamed_controls(self) -> list[str]:
        """Visible controls without an accessible name (aria-label, a label, or their text)."""
        return self.page.evaluate("""() => [...document.querySelectorAll(
            "button, input:not([type=hidden]), textarea, select, [role=button]")]
          .filter((e) => e.checkVisibility() && !(e.getAttribute("aria-label") || "").trim()
                  && !(e.labels && [...e.labels].some((l) => l.textContent.trim()))
                  && !e.textContent.trim() && !e.title && !e.getAttribute("aria-labelledby"))
          .map((e) => e.outerHTML.slice(0, 120))""")

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


@pytest.fixture(scope="module", autouse=True)
def quick_unload():
    """gradio's heartbeat every 0.25 s, not 15 s: a closed tab's unload (which closes its page's
    conversation) runs at once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_IS_E2E_TEST", "1")
        yield


def in_order(seen: list[str], expected: list[str]) -> bool:
    """Whether `expected` appears in `seen` in this order (other states may come between)."""
    rest = iter(seen)
    return all(any(re.fullmatch(state, s) for s in rest) for state in expected)


def font_px(locator) -> float:
    return float(locator.evaluate("e => getComputedStyle(e).fontSize").removesuffix("px"))


def test_one_conversation_per_page_through_voice_text_upload_stop_and_start(page_server, browser, screenshots,
                                                                          speech, tmp_path):
    """One click starts talking (transcribing, in English, as chosen before); #voice-state follows the
    voice loop and the meter the microphone; the reply reads as a message with a footer; a typed turn
    and an upload during the call join its chat and slot; Stop pauses the call and Start continues the
    same conversation (its chat and KV cache); Clear forgets it; controls have names; the console stays
    quiet; closing the tab frees the slot."""
    from playwright.sync_api import expect

    started = time.perf_counter()
    sessions_before = active_sessions(page_server)
    app = Page(browser, page_server, screenshots)
    page, microphone, language = app.page, app.page.locator("#microphone"), app.page.locator("#language")
    chat, shots = page.locator("#conversation"), []
    clip = tmp_path / "upload.wav"
    write_wav(clip, speech[: 2 * SAMPLE_RATE])
    try:
        expect(page.get_by_text(re.compile(r"Ready: .+ on cpu"))).to_be_visible()  # ui.engine_status
        expect(page.locator("#voice-state")).to_have_text("not listening")
        expect(page.get_by_text("Use via API")).to_have_count(0)  # gradio's page of the page's internals
        expect(language).to_be_hidden()  # chat mode: no language to pick
        page.locator("#mode").get_by_text("transcribe", exact=True).click()
        expect(language).to_be_visible()
        language.locator("input").click()
        page.get_by_role("option", name="en", exact=True).click()
        expect(language.locator("input")).to_have_value("en")
        app.record_states()

        microphone.get_by_role("button", name="Start talking").click()  # the only click to start talking
        # the handler asked the page for its controls at start-up (send_input): the first turn is transcribed
        first = app.expect_reply(0, "📝 Transcript (en)", "you stopped")
        expect(page.locator("#voice-state")).to_have_text("listening")
        assert in_order(app.states(), ["not listening", "listening", "hearing you", "thinking|speaking",
                                       "listening"]), app.states()
        assert page.evaluate("window.loudest") > 10  # the meter followed the fake microphone's speech
        user = chat.get_by_test_id("user").first
        expect(user.locator("#duration")).to_have_text(re.compile(r"0:0[1-4]"))  # the clip's player has loaded it
        src = user.locator("a.download-link").get_attribute("href")  # what the player plays
        played = httpx.get(src if src.startswith("http") else page_server.url + src)
        with wave.open(io.BytesIO(played.content)) as heard:
            assert heard.getframerate() == SAMPLE_RATE and 1.0 < heard.getnframes() / SAMPLE_RATE <= SPEECH_S + 0.5
        chat.evaluate("chat => chat.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")  # to the clip
        shots.append(app.screenshot("page-light.png", readme=True))
        page.emulate_media(color_scheme="dark")  # gradio follows the system's scheme
        expect(page.locator("body.dark, .dark").first).to_be_attached()
        page.wait_for_timeout(1000)  # the theme's transitions
        chat.evaluate("chat => chat.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")
        shots.append(app.screenshot("page-dark.png", readme=True))
        page.emulate_media(color_scheme="light")

        page.locator("#mode").get_by_text("chat", exact=True).click()
        app.type("Hello! What can you do?")  # during the call: the call's conversation answers
        typed = app.expect_reply(1, "💬 Reply", "you sent it")
        expect(chat.get_by_test_id("user").nth(1)).to_have_text("Hello! What can you do?")
        assert font_px(typed.locator("p").first) == font_px(chat.get_by_test_id("user").nth(1).locator("p").first)
        assert font_px(first.locator("p").first) == font_px(typed.locator("p").first)  # a finished reply: full size
        assert font_px(first.locator("sub")) < font_px(first.locator("p").first)  # its footer: small
        expect(first.locator("button, details, [aria-expanded]")).to_have_count(0)  # nothing to fold it away

        errors_before = [line for line in app.console if line.startswith("error")]
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="No microphone? Send an audio file").click()
        chooser.value.set_files(str(clip))
        app.expect_reply(2, "💬 Reply", "you sent it")  # the upload joined the call's chat
        expect(chat.get_by_test_id("user")).to_have_count(4)  # its clip, and under it what Voxtral heard
        expect(chat.get_by_test_id("user").nth(2)).to_contain_text("0:02")  # the clip
        expect(chat.get_by_test_id("user").nth(3)).to_have_text(re.compile(r"^\s*“.+”\s*$", re.S))  # its caption
        assert [line for line in app.console if line.startswith("error")] == errors_before  # none from the upload
        assert active_sessions(page_server) == sessions_before + 1  # one page, one slot
        reused = app.reused_tokens()

        microphone.get_by_role("button", name=re.compile("^Stop")).click()
        expect(page.locator("#voice-state")).to_have_text("paused")
        expect(microphone.get_by_role("button", name="Start talking")).to_be_visible()
        assert active_sessions(page_server) == sessions_before + 1  # paused, not forgotten
        microphone.get_by_role("button", name="Start talking").click()
        expect(microphone.get_by_role("button", name=re.compile("^Stop"))).to_be_visible()
        expect(page.locator("#voice-state")).to_have_text(re.compile("listening|hearing you|thinking|speaking"))
        app.type("And then?")
        app.expect_reply(3, "💬 Reply", "you sent it")
        expect(chat.get_by_test_id("user")).to_have_count(5)  # nothing lost across Stop and Start
        assert active_sessions(page_server) == sessions_before + 1
        assert app.reused_tokens()[0] >= reused[1], (reused, app.reused_tokens())  # the same KV cache

        assert not app.unnamed_controls(), app.unnamed_controls()
        page.get_by_role("button", name="Clear conversation").click()
        expect(chat.get_by_test_id("bot")).to_have_count(0)
        app.type("Hi.")
        app.expect_reply(0, "💬 Reply", "you sent it")
        assert app.reused_tokens()[0] < reused[1]  # forgotten: only the system prompt is reused

        session = page.evaluate("window.__gradio_session_hash__")  # bound to the page's token by its requests:
        assert httpx.get(f"{page_server.url}/gradio_api/deep_link", params={"session_hash": session}).status_code \
            == 403  # so a request naming it without the token is refused (it would read the page's state)
        assert len(app.console) <= CONSOLE_LINES_MAX, "\n".join(app.console)
        assert set(app.elsewhere) <= {IFRAME_RESIZER}, app.elsewhere  # works offline: nothing from a CDN
        assert httpx.get(f"{page_server.url}/docs").status_code == 404  # FastAPI's pages load from a CDN
    finally:
        print(f"\nscreenshot: {app.screenshot('browser-reply.png')}")
        print(f"voice states: {page.evaluate('window.states || []')}")
        print(f"console lines: {len(app.console)}: {app.console}")
        print(f"requests elsewhere: {app.elsewhere}")
        app.page.close()
    assert wait_for_sessions(page_server, sessions_before, timeout_s=20) <= sessions_before, \
        "closing the tab did not give its conversation's slot back (the page's unload)"
    print(f"{time.perf_counter() - started:.1f} s; screenshots: {shots}")


def test_on_a_phone_the_chat_and_the_talk_button_come_first_and_the_time_limit_ends_in_words(
        page_server, browser, screenshots, clock):
    """At 390x844 the chat, the talk button and the latest reply show without scrolling, settings
    folded; a turn typed before the call is the call's conversation too; at the call's time limit
    the chat says so (once: no toast), the state is `ended`, and the conversation is kept for the
    next call."""
    from playwright.sync_api import expect

    sessions_before = active_sessions(page_server)
    app = Page(browser, page_server, screenshots, viewport=PHONE)
    page, chat = app.page, app.page.locator("#conversation")
    try:
        expect(page.get_by_text(re.compile(r"Ready: .+ on cpu"))).to_be_visible()
        expect(page.locator("#mode")).to_be_hidden()  # settings start folded on a phone
        app.type("Hello!")  # before any call: the page's conversation all the same
        app.expect_reply(0, "💬 Reply", "you sent it")
        expect(page.locator("#voice-state")).to_have_text("not listening")  # no call: nothing listens
        assert active_sessions(page_server) == sessions_before + 1
        page.get_by_role("button", name="Start talking").click()
        stop = page.get_by_role("button", name=re.compile("^Stop"))
        expect(stop).to_be_visible()
        expect(page.locator("#voice-state")).to_have_text(re.compile("listening|hearing you|thinking|speaking"))
        expect(chat.get_by_test_id("user").first).to_have_text("Hello!")  # the call continued it
        assert active_sessions(page_server) == sessions_before + 1  # in the same slot
        app.type("And you?")  # the latest reply (the fake microphone may be silent now: its file loops)
        expect(page.locator("#typed textarea")).to_have_value("")
        expect(chat.get_by_test_id("user").nth(1)).to_have_text("And you?")
        latest = chat.get_by_test_id("bot").last
        app.expect_reply(-1, "💬 Reply", "you (stopped|sent it)")
        for thing in (stop, latest.locator("sub"), page.locator("#voice-state")):
            box = thing.bounding_box()
            assert box and 0 <= box["y"] and box["y"] + box["height"] <= PHONE["height"], (thing, box)
        assert page.evaluate("window.scrollY") == 0
        app.screenshot("page-phone.png", readme=True)

        clock.skew_s += TIME_LIMIT_S  # the call has lasted its limit, as the handler sees it
        expect(chat.get_by_text(re.compile("This call reached its 15-minute limit"))).to_be_visible()
        expect(page.locator("#voice-state")).to_have_text("ended")
        expect(page.get_by_role("button", name="Start talking")).to_be_visible()
        expect(page.locator(".toast-body:visible")).to_have_count(0)  # said once, in the chat
        assert not app.unnamed_controls(), app.unnamed_controls()  # the stopped microphone's too
        assert active_sessions(page_server) == sessions_before + 1  # the conversation waits for the next call
    finally:
        print(f"\nscreenshot: {app.screenshot('browser-phone-ended.png')}")
        print(f"console lines: {len(app.console)}: {app.console}")
        app.page.close()
    assert wait_for_sessions(page_server, sessions_before, timeout_s=20) <= sessions_before


def test_the_console_is_quiet_unless_debug(app_engine):
    """--debug (app.py passes it as ServerOptions.debug) keeps fastrtc's console chatter; otherwise the page
    silences console.log/debug/info. Both pages load no remote sound."""
    from voxtral_app.serving.app import ServerOptions, create_app
    from voxtral_app.serving.page_scripts import OFFLINE, QUIET_CONSOLE

    quiet, chatty = (create_app(app_engine, app_options(app_engine), options=ServerOptions(debug=debug)).state.ui
                     for debug in (False, True))
    assert QUIET_CONSOLE in quiet.head and QUIET_CONSOLE not in chatty.head
    assert OFFLINE in quiet.head and OFFLINE in chatty.head
