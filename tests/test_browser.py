"""The whole app from a real browser: headless Chromium speaks into the Microphone over WebRTC
(a fake capture device playing real speech, then silence) and the Conversation shows Voxtral's reply."""

import os
import re
import time
import wave

import httpx
import numpy as np
import pytest

from voxtral_app.audio import SAMPLE_RATE

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
SILENCE_S = 20.0  # of silence (chromium loops the file): the turn ends, and the next starts only 24 s later
REPLY_TIMEOUT_MS = 90_000  # to the first reply text; ~5 s on CPU
REPLY_DONE_TIMEOUT_MS = 15_000  # then to the turn's last update (< SILENCE_S: the next turn must not flush it)
OUTPUT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "test-output")  # git-ignored


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


@pytest.fixture
def browser(live_server, tmp_path, speech):
    """Chromium whose microphone plays speech; closing it waits for the server to drop its connections
    (a reply still decoding on the engine's daemon thread at interpreter exit aborts the process)."""
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    wav = write_fake_mic(str(tmp_path / "fake-mic.wav"), speech)
    sessions = active_sessions(live_server)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        yield browser
        browser.close()
    wait_for_sessions(live_server, sessions)


def test_speaking_into_the_microphone_gets_a_reply(live_server, browser):
    from playwright.sync_api import expect

    started = time.perf_counter()
    sessions_before = active_sessions(live_server)
    page = browser.new_page()
    screenshot = os.path.join(OUTPUT_DIR, "browser-reply.png")
    try:
        page.goto(live_server.url)
        expect(page.get_by_text(re.compile(r"Ready: .+ on cpu"))).to_be_visible()  # ui.engine_status

        block = page.locator(".block")  # a Gradio component, found by its label
        microphone = block.filter(has=page.get_by_test_id("block-label").filter(has_text="Microphone"))
        conversation = block.filter(has=page.get_by_test_id("block-label").filter(has_text="Conversation"))
        microphone.get_by_role("button", name="Click to Access Microphone").click()
        microphone.get_by_role("button", name="start stream").click()  # "Record"

        reply = conversation.get_by_test_id("bot").first
        expect(reply.locator(".message-content")).to_have_text(re.compile(r"\S"), timeout=REPLY_TIMEOUT_MS)
        # the turn's last update carries the latency title: the whole reply reached the page
        expect(reply).to_contain_text("ms to first token", timeout=REPLY_DONE_TIMEOUT_MS)
        expect(conversation.get_by_test_id("user").first).to_contain_text("s of speech")
    finally:
        os.makedirs(OUTPUT_DIR, exist_ok=True)
        page.screenshot(path=screenshot, full_page=True)
        print(f"\nscreenshot: {screenshot}")

    microphone.get_by_role("button", name="start stream").filter(has_text="Stop").click()
    assert wait_for_sessions(live_server, sessions_before) <= sessions_before, "Stop left the connection open"
    print(f"reply: {reply.locator('.message-content').inner_text()!r} ({time.perf_counter() - started:.1f} s)")
