"""The whole app from a real browser: headless Chromium speaks into the Microphone over WebRTC
(a fake capture device playing real speech, then silence) and the Conversation shows Voxtral's reply."""

import os
import re
import time
import wave

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
    "--disable-background-networking",  # with no network these calls make chromium hang
    "--disable-component-update",
    "--disable-sync",
]
SPEECH_S = 4.0  # of SPEECH_WAV, then
SILENCE_S = 3.0  # of silence, so a turn ends; chromium loops the file
REPLY_TIMEOUT_MS = 90_000  # typically ~10 s on CPU


def write_fake_mic(path: str, speech: np.ndarray) -> str:
    """16-bit PCM mono WAV at 16 kHz: speech then silence."""
    audio = np.concatenate([speech[: int(SPEECH_S * SAMPLE_RATE)], np.zeros(int(SILENCE_S * SAMPLE_RATE), np.float32)])
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def browser(tmp_path, speech):
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    wav = write_fake_mic(str(tmp_path / "fake-mic.wav"), speech)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        yield browser
        browser.close()


def test_speaking_into_the_microphone_gets_a_reply(live_server, browser, tmp_path):
    from playwright.sync_api import expect

    started = time.perf_counter()
    page = browser.new_page()
    page.goto(live_server.url)
    expect(page.get_by_text(re.compile(r"Ready: .* on cpu"))).to_be_visible()

    microphone = page.locator(".block", has=page.get_by_test_id("block-label").filter(has_text="Microphone"))
    microphone.get_by_role("button", name="Click to Access Microphone").click()
    microphone.get_by_role("button", name="start stream").click()

    conversation = page.locator(".block", has=page.get_by_test_id("block-label").filter(has_text="Conversation"))
    reply = conversation.get_by_test_id("bot").last
    expect(reply).to_have_text(re.compile(r"\S"), timeout=REPLY_TIMEOUT_MS)
    print(reply.inner_html())

    screenshot = tmp_path / "reply.png"
    page.screenshot(path=screenshot, full_page=True)
    print(f"\nscreenshot: {screenshot} ({time.perf_counter() - started:.1f} s)")
