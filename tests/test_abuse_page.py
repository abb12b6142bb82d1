"""The page's own (gradio) routes against hostile clients (issue 29): files, made-up ids, queue floods,
errors. Raw httpx requests, as a script would send them, not the page's own client."""

import json
import os
import secrets
import time

import httpx
import numpy as np
import pytest
from conftest import app_options, write_wav
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.serving.app import create_app


@pytest.fixture(scope="module")
def page(app_engine):
    os.environ["GRADIO_IS_E2E_TEST"] = "1"  # gradio's heartbeat every 0.25 s: a closed page is noticed at once
    served = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=8)))
    yield served
    served.stop()
    os.environ.pop("GRADIO_IS_E2E_TEST", None)


NO_MICROPHONE = {"webrtc_id": ""}  # the microphone component's value on a page that has not connected it



def fn_index(served, name: str) -> int:
    return next(i for i, fn in served.app.state.ui.fns.items() if fn.name == name)


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": os.path.basename(path)}


def client(visitor: str = "203.0.113.1") -> httpx.Client:
    """A visitor from `visitor`, through a reverse proxy on this host (which the server trusts by
    default): loopback itself is exempt from the per-address limits."""
    return httpx.Client(timeout=30, headers={"X-Forwarded-For": visitor})


def join(http: httpx.Client, served, name: str, data: list, session: str) -> httpx.Response:
    return http.post(f"{served.url}/gradio_api/queue/join",
                     json={"data": data, "fn_index": fn_index(served, name), "session_hash": session,
                           "event_data": None, "trigger_id": None})


def outcome(http: httpx.Client, served, session: str, timeout_s: float = 60, logs: list | None = None) -> dict:
    """The session's events' messages until one completes: its process_completed message, with the
    last whole chat it streamed as "chat" (the warnings it showed on the way go to `logs`)."""
    chat = None
    with http.stream("GET", f"{served.url}/gradio_api/queue/data", params={"session_hash": session},
                     timeout=timeout_s) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "log" and logs is not None:
                    logs.append(message.get("log"))
                if message.get("msg") == "process_generating":  # the chat's updates come as diffs after the first
                    for op in ((message.get("output") or {}).get("data") or [[]])[0] or []:
                        if isinstance(op, list) and op[:2] == ["replace", []] and isinstance(op[2], list):
                            chat = op[2]  # the whole chat
                if message.get("msg") == "process_completed":
                    return {**message, "chat": chat}
    raise AssertionError("the event stream ended without a result")


def drain(http: httpx.Client, served, session: str, count: int) -> int:
    """Read the session's event stream until `count` events have completed."""
    done = 0
    with http.stream("GET", f"{served.url}/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                done += 1
                if done == count:
                    break
    return done


def upload(http: httpx.Client, served, path: str) -> str:
    with open(path, "rb") as f:
        response = http.post(f"{served.url}/gradio_api/upload", files={"files": (os.path.basename(path), f)})
    assert response.status_code == 200, response.text
    return response.json()[0]


def file_events(served) -> list[str]:
    """The page's events that take a file (an audio or file component) as an input."""
    return sorted(fn.name for fn in served.app.state.ui.fns.values()
                  if any(getattr(block, "data_model", None) is not None and "File" in block.data_model.__name__
                         for block in fn.inputs))


def test_page_events_take_only_files_their_own_session_uploaded(page, speech, tmp_path):
    secret = write_wav(tmp_path / "voicemail.wav", speech[: 2 * SAMPLE_RATE])  # on the server's disk, never uploaded
    mine = write_wav(tmp_path / "mine.wav", speech[: 2 * SAMPLE_RATE])
    assert file_events(page) == ["send_upload"]
    controls = [None, "chat", "auto", 0.2]  # the page's key (server-side state), mode, language, temperature
    with client() as http, client("203.0.113.2") as elsewhere:
        refused = {}
        for label, path in (("exists", secret), ("missing", str(tmp_path / "nothing.wav"))):
            session = secrets.token_hex(5)
            assert join(http, page, "send_upload", [file_data(path), *controls], session).status_code == 200
            refused[label] = outcome(http, page, session)
        uploaded = upload(http, page, mine)
        owner = secrets.token_hex(5)
        join(http, page, "send_upload", [file_data(uploaded), *controls], owner)
        answered = outcome(http, page, owner)
        other_session = secrets.token_hex(5)
        join(http, page, "send_upload", [file_data(uploaded), *controls], other_session)
        stolen = outcome(http, page, other_session)
        other_address = secrets.token_hex(5)
        join(elsewhere, page, "send_upload", [file_data(uploaded), *controls], other_address)
        stolen_elsewhere = outcome(elsewhere, page, other_address)
        with http.stream("GET", f"{page.url}/gradio_api/heartbeat/{owner}") as beat:
            next(beat.iter_lines())  # the page is open; leaving the block closes it: its unload runs
        deadline = time.monotonic() + 10
        while os.path.exists(uploaded) and time.monotonic() < deadline:
            time.sleep(0.05)
    for message in (refused["exists"], refused["missing"], stolen, stolen_elsewhere):
        assert not message["success"], message
    assert refused["exists"]["output"] == refused["missing"]["output"]  # no oracle for the server's disk
    assert answered["success"], answered
    history = answered["chat"]  # the last chat the event streamed
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert not os.path.exists(uploaded)  # deleted when its page closed


def test_a_page_connection_answers_only_the_page_session_that_offered_it(page):
    """Knowing a page connection's id is not enough to read its chat or change its settings: an event that
    names it is taken only from the gradio session whose offer used it."""
    connection = {"webrtc_id": secrets.token_hex(6)}
    owner, stranger = secrets.token_hex(5), secrets.token_hex(5)
    component = next(block._id for block in page.app.state.ui.blocks.values() if type(block).__name__ == "WebRTC")
    with client() as http:
        http.post(f"{page.url}/gradio_api/component_server", json={  # the owner's offer (its SDP is refused)
            "session_hash": owner, "component_id": component, "fn_name": "offer",
            "data": {**connection, "type": "offer", "sdp": "v=0"}})
        stolen = join(http, page, "handler", [connection, [], ""], stranger)
        owned = join(http, page, "handler", [connection, [], ""], owner)
        ended = outcome(http, page, owner, timeout_s=20)  # read: no event stays pending for this address
    assert stolen.status_code == 403 and "another page" in stolen.text
    assert owned.status_code == 200 and ended["msg"] == "process_completed"


def test_made_up_connection_ids_end_their_chat_updates_at_once(page, app_engine):
    """fastrtc's chat-update event for an id that never connected used to run for ever, and
    `--max-sessions` of them stopped every page's chat."""
    with client() as http:
        sessions = [secrets.token_hex(5) for _ in range(app_engine.options.slots + 1)]
        for session in sessions:
            made_up = {"webrtc_id": secrets.token_hex(6)}
            assert join(http, page, "handler", [made_up, [], ""], session).status_code == 200
        ended = [outcome(http, page, session, timeout_s=20) for session in sessions]
    assert all(message["msg"] == "process_completed" for message in ended)


def test_one_address_may_hold_only_a_few_page_events(page):
    bound = 8  # ServerOptions.page_events_per_address
    with client() as http, client("203.0.113.2") as elsewhere:
        session = secrets.token_hex(5)
        codes = [join(http, page, "send_text", ["", NO_MICROPHONE, "chat", "auto", 0.2], session).status_code
                 for _ in range(bound + 1)]  # never read: each stays pending
        newcomer = join(elsewhere, page, "send_text", ["", NO_MICROPHONE, "chat", "auto", 0.2], secrets.token_hex(5))
        read = drain(http, page, session, bound)  # a page reads its events: then the address may send more
        after = join(http, page, "send_text", ["", NO_MICROPHONE, "chat", "auto", 0.2], session).status_code
        drain(http, page, session, 1)
    assert codes == [200] * bound + [503]
    assert newcomer.status_code == 200
    assert read == bound and after == 200


MALFORMED_UPLOADS = {  # body, content type
    "no boundary": (b"junk", "multipart/form-data"),
    "no name": (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data; boundary=x"),
    "a field, not a file": (b'--x\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc\r\n--x--\r\n',
                            "multipart/form-data; boundary=x"),
    "no header value": (b"--x\r\nContent-Disposition\r\n\r\nabc\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    "a path for a name": (b'--x\r\nContent-Disposition: form-data; name="files"; filename="../.."\r\n\r\nabc\r\n'
                          b"--x--\r\n", "multipart/form-data; boundary=x"),
}


def test_a_malformed_upload_gets_a_4xx_without_a_traceback(page):
    with client() as http:
        answers = {name: http.post(f"{page.url}/gradio_api/upload", content=body, headers={"content-type": kind})
                   for name, (body, kind) in MALFORMED_UPLOADS.items()}
    assert {name: r.status_code // 100 for name, r in answers.items()} == dict.fromkeys(answers, 4), \
        {name: (r.status_code, r.text[:200]) for name, r in answers.items()}
    assert not [r for r in answers.values() if "Traceback" in r.text or "site-packages" in r.text]


def test_one_address_opens_at_most_two_page_conversations(page, app_engine):
    """Made-up page sessions typing into the text box each opened a conversation: a few took every slot."""
    parking = page.app.state.ui.parking
    sessions = [secrets.token_hex(5) for _ in range(3)]
    newcomer = secrets.token_hex(5)
    warnings, kept_before = {}, len(parking)
    try:
        with client() as http, client("203.0.113.2") as elsewhere:
            for session, via in [(s, http) for s in sessions] + [(newcomer, elsewhere)]:
                warnings[session] = []
                join(via, page, "send_text", ["Hello there.", None, "chat", "auto", 0.2], session)
                outcome(via, page, session, logs=warnings[session])
        kept = len(parking) - kept_before  # each page's conversation waits in the parking between its turns
    finally:
        parking.close_all()
    assert kept == 3, warnings  # two from the hoarding address, one from the newcomer
    assert any("conversations open on this page" in w for w in warnings[sessions[2]]), warnings
    assert not any("conversations open" in w for s in sessions[:2] + [newcomer] for w in warnings[s]), warnings


def test_page_conversations_and_unconnected_sessions_share_one_count_per_address(page, app_engine):
    """An address's idle page conversation and its created-but-unconnected session are counted together:
    two in all, whichever route the third comes from, while another address is still served."""
    parking = page.app.state.ui.parking
    sessions = [secrets.token_hex(5) for _ in range(2)]
    warnings: list = []
    try:
        with client("203.0.113.30") as http, client("203.0.113.31") as elsewhere:
            join(http, page, "send_text", ["Hello there.", None, "chat", "auto", 0.2], sessions[0])
            outcome(http, page, sessions[0])  # its conversation now waits between turns
            created = http.post(f"{page.url}/session/create", json={})
            second = http.post(f"{page.url}/session/create", json={})
            join(http, page, "send_text", ["And me?", None, "chat", "auto", 0.2], sessions[1])
            outcome(http, page, sessions[1], logs=warnings)
            newcomer = elsewhere.post(f"{page.url}/session/create", json={})
    finally:
        parking.close_all()
    assert created.status_code == 200
    assert second.status_code == 429 and second.json()["meta"]["error"] == "too_many_pending", second.text
    assert any("conversations open on this page" in w for w in warnings), warnings
    assert newcomer.status_code == 200, newcomer.text


def test_uploads_are_capped_per_address_and_in_total(app_engine, speech, tmp_path):
    from voxtral_app.serving.app import ServerOptions
    from voxtral_app.serving.uploads import UploadOptions

    clip = write_wav(tmp_path / "clip.wav", speech[: 2 * SAMPLE_RATE])  # ~64 kB
    size = os.path.getsize(clip)
    caps = UploadOptions(per_address_bytes=int(1.5 * size) + 1_000, total_bytes=int(2.5 * size) + 2_000)
    served = BackgroundServer(create_app(app_engine, app_options(app_engine), options=ServerOptions(uploads=caps)))

    def send(visitor: str) -> int:
        with client(visitor) as http, open(clip, "rb") as f:
            return http.post(f"{served.url}/gradio_api/upload", files={"files": ("clip.wav", f)}).status_code

    try:
        codes = [send("203.0.113.1"), send("203.0.113.1"), send("203.0.113.2"), send("203.0.113.3")]
    finally:
        served.stop()
    assert codes == [200, 429, 200, 429]  # the first address's second; then the server's total
    # the same file from two visitors is one path with two owners: each may use it
    path = next(iter(served.app.state.uploads_ledger.uploads))
    assert served.app.state.uploads_ledger.allowed(path, "page-a", "203.0.113.1")
    assert served.app.state.uploads_ledger.allowed(path, "page-b", "203.0.113.2")
    assert not served.app.state.uploads_ledger.allowed(path, "page-c", "203.0.113.1")


def test_an_uploaded_audio_bomb_is_refused_from_its_header(page, tmp_path):
    """10 minutes of 8-channel silence in ~80 kB of FLAC: refused before gr.Audio decodes it."""
    import soundfile as sf

    bomb = str(tmp_path / "bomb.flac")
    sf.write(bomb, np.zeros((16_000 * 600, 8), np.float32), 16_000, format="FLAC")
    with client("203.0.113.9") as http:
        uploaded = upload(http, page, bomb)
        session = secrets.token_hex(5)
        warnings = []
        join(http, page, "send_upload", [file_data(uploaded), None, "chat", "auto", 0.2], session)
        outcome(http, page, session, logs=warnings)
    assert any("600 s long" in warning for warning in warnings), warnings


PAGE = "X-Voxtral-Page"  # page_sessions.PAGE_TOKEN_HEADER: the page's own token, made once per page load


def test_a_page_session_obeys_only_the_token_it_was_bound_to(page):
    """gradio's browser client names its session with Math.random(); the page's requests carry a token of
    its own, and its session answers only that token on every route that names it (body, query, path)."""
    session, mine = secrets.token_hex(5), secrets.token_urlsafe(24)
    connection = {"webrtc_id": secrets.token_hex(6)}  # never connected: its chat updates end at once
    component = next(block._id for block in page.app.state.ui.blocks.values() if type(block).__name__ == "WebRTC")
    turn = {"session_hash": session, "component_id": component, "fn_name": "turn", "data": None}

    def routes(http: httpx.Client) -> list[httpx.Response]:
        """Each kind of route that names the session (in its body, query string or path)."""
        return [join(http, page, "handler", [connection, [], ""], session),
                http.get(f"{page.url}/gradio_api/queue/data", params={"session_hash": session}),
                http.post(f"{page.url}/gradio_api/component_server", json=turn),
                http.get(f"{page.url}/gradio_api/heartbeat/{session}"),
                http.get(f"{page.url}/gradio_api/queue/data?session%5Fhash={session}"),  # as Starlette decodes it
                http.get(f"{page.url}/gradio_api/deep_link", params={"session_hash": session}),  # the page's state
                http.post(f"{page.url}/gradio_api/cancel", json={"session_hash": session, "fn_index": 0,
                                                                 "event_id": "x"})]

    with client("203.0.113.20") as owner, client("203.0.113.21") as tokenless, \
            client("203.0.113.21") as other, client("203.0.113.21") as malformed:
        # the page's client opens its heartbeat before the page's scripts run: without the token, binding nothing
        with owner.stream("GET", f"{page.url}/gradio_api/heartbeat/{session}") as beat:
            next(beat.iter_lines())
            owner.headers[PAGE] = mine
            owned = join(owner, page, "handler", [connection, [], ""], session)  # binds the session to `mine`
            other.headers[PAGE] = secrets.token_urlsafe(24)
            refused = {"no token": routes(tokenless), "another token": routes(other)}
            ended = outcome(owner, page, session, timeout_s=20)  # the owner's events still stream
            ice = owner.post(f"{page.url}/gradio_api/component_server", json=turn)
            malformed.headers[PAGE] = "short"
            odd = [malformed.post(f"{page.url}/gradio_api/component_server", json=turn),
                   tokenless.get(f"{page.url}/gradio_api/heartbeat/{'x' * 65}"),
                   owner.post(f"{page.url}/gradio_api/component_server", files={"session_hash": (None, session)})]
    assert owned.status_code == 200, owned.text
    for label, answers in refused.items():
        assert [r.status_code for r in answers] == [403] * 7, (label, [(r.status_code, r.text) for r in answers])
        assert all(r.json()["meta"]["error"] == "forbidden" and session not in r.text for r in answers)
    assert ended["msg"] == "process_completed" and ended["success"], ended
    assert ice.status_code == 200 and ice.json() == {}
    assert [r.status_code for r in odd] == [400, 400, 415]  # a malformed token or name; a form gradio would read


def test_a_tokenless_gradio_client_session_works_and_one_with_the_header_is_bound(page, speech, tmp_path):
    """gradio_client names its session with uuid4 and sends no page token: its session stays tokenless (and
    works end to end); given the header (`Client(..., headers=...)`) it is bound like the page's."""
    from gradio_client import Client as PageClient
    from gradio_client import handle_file

    clip = write_wav(tmp_path / "turn.wav", speech[: 2 * SAMPLE_RATE])
    token = secrets.token_urlsafe(24)
    answers, probes = [], []
    for headers in (None, {PAGE: token}):
        caller = PageClient(page.url + "/", verbose=False, headers=headers)
        try:
            job = caller.submit(handle_file(clip), "chat", "auto", 0.2, api_name="/send_upload")
            job.result(timeout=60)
            answers.append([update[0] for update in job.outputs() if isinstance(update[0], list)][-1])
            probe = {"session_hash": caller.session_hash, "fn_index": fn_index(page, "send_upload"), "event_id": "x"}
            probes.append([httpx.post(f"{page.url}/gradio_api/cancel", json=probe, headers=h, timeout=10).status_code
                           for h in ({}, {PAGE: token}, {PAGE: secrets.token_urlsafe(24)})])
        finally:
            caller.close()
    assert all([m["role"] for m in history] == ["user", "assistant"] for history in answers), answers
    assert probes == [[200, 403, 403],  # tokenless: only tokenless requests
                      [403, 200, 403]]  # bound to its header's token


def test_page_sessions_stay_bounded_and_keep_the_live_ones():
    """An address that mints sessions forgets its own oldest; past the total, the least recently used
    anywhere goes, and a session in use stays."""
    from voxtral_app.serving.page_sessions import PageSessions

    pages = PageSessions(limit=6, per_address=3)
    live = "live-page"
    assert pages.allowed(live, "t" * 32, "198.51.100.7")
    minted = [f"minted-{i}" for i in range(20)]
    for i, session in enumerate(minted):
        assert pages.allowed(session, "", f"203.0.113.{i % 4}")  # a few addresses, many sessions
        assert pages.allowed(live, "t" * 32, "198.51.100.7")  # the live page keeps asking
    assert len(pages) == 6 and all(len(mine) <= 3 for mine in pages.by_address.values())
    assert live in pages.tokens and not pages.allowed(live, "", "203.0.113.1")  # still bound to its token
    assert minted[0] not in pages.tokens  # forgotten: its next request binds it again
    assert sum(len(mine) for mine in pages.by_address.values()) == len(pages)
