import inspect

import httpx
import pytest
from conftest import app_options
from fastrtc import WebRTC
from servers import BackgroundServer

from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.ice import IceOptions, missing_credentials, rtc_configuration

SPACE = {"SPACE_ID": "someone/voxtral", "SYSTEM": "spaces", "HF_TOKEN": "hf_test"}


class FakeCredentials:
    """Stands in for fastrtc.get_cloudflare_turn_credentials: new credentials on every call, no network."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kwargs) -> dict:
        self.calls.append(kwargs)
        return {"iceServers": [{"urls": ["turn:turn.example.com:3478"], "username": f"user{len(self.calls)}",
                                "credential": "secret"}]}


def test_nothing_configured_off_a_space_is_none():
    assert rtc_configuration(IceOptions(), environ={}) is None
    assert missing_credentials(IceOptions(), environ={}) is None


def test_turn_flags_give_a_fixed_configuration():
    configuration = rtc_configuration(IceOptions("turn:turn.example.com:3478, turns:turn.example.com:5349", "me",
                                                 "pw"), environ=SPACE)  # flags win on a Space too
    assert configuration == {"iceServers": [{"urls": ["turn:turn.example.com:3478", "turns:turn.example.com:5349"],
                                             "username": "me", "credential": "pw"}]}
    assert rtc_configuration(IceOptions("stun:stun.example.com:3478"), environ={}) == {
        "iceServers": [{"urls": ["stun:stun.example.com:3478"]}]}


@pytest.mark.parametrize("options, message", [
    (IceOptions("http://turn.example.com"), "must start with"),
    (IceOptions("turn:turn.example.com:3478"), "--turn-username"),
    (IceOptions(rtc_configuration="{not json"), "not JSON"),
    (IceOptions(rtc_configuration='{"iceServers": []}'), "iceServers"),
    (IceOptions(rtc_configuration='[{"urls": "turn:x"}]'), "iceServers"),
    (IceOptions(turn_provider="carrier-pigeon"), "unknown TURN provider"),
])
def test_malformed_configuration_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        rtc_configuration(options, environ={})


def test_json_configuration_is_passed_through():
    text = ('{"iceServers": [{"urls": "turn:t.example.com", "username": "u", "credential": "c"}], '
            '"iceTransportPolicy": "relay"}')
    assert rtc_configuration(IceOptions(rtc_configuration=text), environ={})["iceTransportPolicy"] == "relay"


def test_on_a_space_each_connection_fetches_fresh_credentials():
    fake = FakeCredentials()
    configuration = rtc_configuration(IceOptions(), environ=SPACE, fetch=fake)
    assert inspect.isfunction(configuration)  # fastrtc only calls plain functions, anything else is used as-is
    assert fake.calls == []  # nothing is fetched at start
    first, second = configuration(), configuration()
    assert first["iceServers"][0]["username"] == "user1" and second["iceServers"][0]["username"] == "user2"
    assert fake.calls == [{"ttl": 3600}, {"ttl": 3600}]


def test_twilio_provider_off_a_space():
    fake = FakeCredentials()
    configuration = rtc_configuration(IceOptions(turn_provider="twilio"), environ={}, fetch=fake)
    assert configuration()["iceServers"] and fake.calls == [{}]  # Twilio's function takes no ttl
    assert "TWILIO_ACCOUNT_SID + TWILIO_AUTH_TOKEN" in missing_credentials(IceOptions(turn_provider="twilio"), {})


def test_a_provider_answer_without_servers_is_an_error():
    configuration = rtc_configuration(IceOptions(), environ=SPACE, fetch=lambda **_: {"error": "quota"})
    with pytest.raises(RuntimeError, match="no ICE servers"):
        configuration()


def test_a_space_without_a_token_says_what_to_set():
    problem = missing_credentials(IceOptions(), environ={"SPACE_ID": "someone/voxtral"})
    assert "HF_TOKEN" in problem and "secret" in problem
    assert missing_credentials(IceOptions(), environ=SPACE) is None
    keys = {"SPACE_ID": "x/y", "CLOUDFLARE_TURN_KEY_ID": "id", "CLOUDFLARE_TURN_KEY_API_TOKEN": "token"}
    assert missing_credentials(IceOptions(), environ=keys) is None


def test_the_page_gets_fresh_credentials_from_the_served_app(app_engine):
    """The wiring, offline: ServerOptions(rtc_configuration=...) -> the page's WebRTC component, asked over HTTP
    the way the browser asks (gradio's component server, fastrtc's `turn` function)."""
    fake = FakeCredentials()
    app = create_app(app_engine, app_options(app_engine), options=ServerOptions(rtc_configuration=rtc_configuration(
        IceOptions(), environ=SPACE, fetch=fake)))
    component = next(block for block in app.state.ui.blocks.values() if isinstance(block, WebRTC))
    server = BackgroundServer(app)
    try:
        answers = [httpx.post(f"{server.url}/gradio_api/component_server", timeout=30, json={
            "session_hash": "test", "component_id": component._id, "fn_name": "turn", "data": None}).json()
            for _ in range(2)]
    finally:
        server.stop()
    assert [answer["iceServers"][0]["username"] for answer in answers] == ["user1", "user2"]
    assert len(fake.calls) == 2
