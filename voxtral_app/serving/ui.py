"""The Gradio page: microphone (FastRTC WebRTC) with the voice loop's state and a level meter, the
chat, a text box, an upload path for people without a microphone, mode/language/temperature/voice
settings, clear, and the model's warm-up status.

One conversation per page: the page's key (a server-side gr.State, PageKey) names it; the
microphone's connections, typed turns and uploads all use it, and between calls it waits in the
page's Parking (Stop then Start, a dropped connection, typing without a call). Clear forgets its
messages; a reload starts a new one.
"""

import itertools
import logging
import os
import queue
import threading

import gradio as gr
import numpy as np
import soundfile as sf
from fastrtc import WebRTC

from ..audio.pcm import SAMPLE_RATE, AudioError, decode_file
from ..backends.contract import EngineBusy, EngineFailed
from ..conversation.conversation import Conversation
from ..conversation.parking import Parking
from . import metrics
from .chat_view import STATE_WORDS, ChatView, Output, reply_kind
from .handler import VoxtralHandler, refusal, settings_from_controls
from .page_calls import PageCalls, PageConversation, PageKey
from .page_scripts import (
    CSS,
    LEVEL_METER,
    OFFLINE,
    ONE_CLICK,
    PAGE_TOKEN,
    QUIET_CONSOLE,
)

logger = logging.getLogger(__name__)

LANGUAGES = ["auto", "en", "fr", "de", "es", "it", "pt", "nl", "hi"]  # Voxtral's languages

THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"])  # not Google Fonts: offline
BUTTON_LABELS = {"start": "Start talking", "stop": "Stop", "waiting": "Connecting…"}


def engine_status(engine) -> str:
    name = os.path.basename(engine.options.model.rstrip("/"))  # a hub id's or a directory's last part: no local paths
    where = f"`{name}` on {engine.device_kind}" + (" (compiled)" if engine.compiled else "")
    busy = f"{engine.active_chats}/{engine.options.slots} conversations"
    if not engine.ready.is_set():
        return f"⏳ Warming up {where}… replies start once it is ready."
    return f"✅ Ready: {where} · {busy}"


REDRAWS = itertools.count()  # each #voice-state value differs, so the page redraws it even when only its own
# script changed it (to `paused`, at Stop) since the server last sent the same state


def voice_state(state: str) -> str:
    """The `#voice-state` element's content: the state in words (a live region) and its cue."""
    words = STATE_WORDS.get(state, "not listening")
    return (f'<div class="voice-state" data-state="{state or "off"}" data-n="{next(REDRAWS)}">'
            '<span class="cue" aria-hidden="true"></span>'
            f'<span class="words" role="status" aria-live="polite">{words}</span></div>')


VOICE_METER = ('<div class="meter" role="meter" aria-label="Your microphone level" aria-valuemin="0" '
               'aria-valuemax="100" aria-valuenow="0"><div></div></div>')


def show(history, status, final=False, state=""):
    """AdditionalOutputs(history, status, final, state) -> chatbot, the turn line and the voice state.
    A state change alone leaves the chat and the line as they are."""
    if status.get("error"):
        gr.Warning(status["error"])
    if state and not status:
        return gr.skip(), gr.skip(), voice_state(state)
    return history, turn_line(status), voice_state(state) if state else gr.skip()


def turn_line(status: dict) -> str:
    """The last reply's details in words, under the settings."""
    if status.get("first_token_ms") is None:
        return ""
    after = "you stopped speaking" if status.get("source", "speech") == "speech" else "you sent it"
    line = (f"Last {reply_kind(status['mode'], status.get('language', ''))}: first word "
            f"{status['first_token_ms']} ms after {after}")
    if status.get("source", "speech") == "speech":
        line += f" (of which {status['pause_ms']} ms waiting to be sure you had finished)"
    return (line + f" · {status['tokens_per_s']} tok/s · {status['cached_tokens']} of "
            f"{status['cached_tokens'] + status['prefill_tokens']} prompt tokens reused from earlier turns")


TURN_TIMEOUT_S = 600.0  # a typed or uploaded turn's reply (without a call) must finish within this


class PageConversations:
    """Each page's one conversation, found by its key (PageCalls): the microphone connection's
    while a call is up, else parked (typed turns and uploads take it out for their reply and park
    it again). `pages` (gradio session -> key, so the page's unload can close its conversation) is
    guarded by `lock`."""

    def __init__(self, engine, handler: VoxtralHandler, calls: PageCalls):
        self.engine = engine
        self.handler = handler
        self.calls = calls
        self.lock = threading.Lock()
        self.pages: dict[str, PageKey] = {}

    def live(self, key: PageKey | None) -> Conversation | None:
        """The page's conversation while its call is up (only the page's key finds it)."""
        return self.calls.live(key)

    def take(self, key: PageKey) -> PageConversation | None:
        """The page's parked conversation, or a new one; None (after telling the person why) if
        there is no room."""
        parked = self.calls.take(key)
        if parked is not None:
            return parked
        options = self.handler.options
        try:
            conversation = Conversation(self.engine, options, self.handler.speaker, name="ui_page",
                                        listener=metrics.conversation_event).open()
        except (EngineBusy, EngineFailed) as error:
            metrics.REJECTED.inc()
            gr.Warning(refusal(self.engine, error))
            return None
        return PageConversation(conversation, ChatView(options, "ui_page"))

    def park(self, key: PageKey, page: PageConversation) -> None:
        self.calls.park(key, page)

    def opened(self, session: str, key: PageKey) -> None:
        with self.lock:
            self.pages[session] = key

    def closed(self, session: str) -> None:
        """The page is gone: its conversation (parked, or parked once its call ends) closes."""
        with self.lock:
            key = self.pages.pop(session, None)
        if key is None:
            return
        if (conversation := self.live(key)) is not None:  # its call is still up (until ICE notices): end it too
            conversation.close()
        self.calls.forget(key)  # parked, or parked by its connection from now on


def build_ui(engine, handler: VoxtralHandler, concurrency_limit: int, time_limit: float | None,
             rtc_configuration=None, debug: bool = False, resume_s: float = 120.0) -> gr.Blocks:
    """`debug`: keep the browser console's chatter (fastrtc logs every message). `resume_s`: how long
    a page's conversation waits for its next call or turn (ServerOptions.resume_s)."""
    head = PAGE_TOKEN + OFFLINE + LEVEL_METER + ("" if debug else QUIET_CONSOLE)
    parking = Parking(resume_s)
    calls = PageCalls(parking)
    page_handler = handler
    if isinstance(handler, VoxtralHandler):  # the page's connections share the page's conversation
        page_handler = handler.copy()
        page_handler.calls, page_handler.time_limit_s = calls, time_limit
    with gr.Blocks(title="Voxtral realtime", theme=THEME, head=head, js=ONE_CLICK, css=CSS,
                   delete_cache=(900, 3600)) as demo:  # the chat's copies of clips and uploads: an hour
        gr.Markdown("# Voxtral realtime\nClick **Start talking**, speak, and pause: Voxtral answers as soon as "
                    "you stop. Speak over a reply to interrupt it, or type below the conversation.",
                    elem_id="page-intro")
        status = gr.Markdown(engine_status(engine), elem_id="engine-status")
        key = gr.State(None)  # the page's PageKey, made when it loads (page_opened); it stays on the server
        with gr.Row(elem_id="talk-row"):
            with gr.Column(scale=1):
                voice = gr.HTML(voice_state(""), elem_id="voice-state")
                gr.HTML(VOICE_METER, elem_id="voice-meter")
                microphone = WebRTC(modality="audio", mode="send-receive", label="Microphone", full_screen=False,
                                    rtc_configuration=rtc_configuration, button_labels=BUTTON_LABELS,
                                    elem_id="microphone")  # full screen: fixed over the page
                with gr.Accordion("Settings", open=True, elem_id="settings"):
                    mode = gr.Radio(["chat", "transcribe"], value="chat", label="Mode", elem_id="mode",
                                    info="chat: Voxtral answers · transcribe: Voxtral writes down what you said")
                    language = gr.Dropdown(LANGUAGES, value="auto", label="Transcription language", visible=False,
                                           elem_id="language")  # shown in transcribe mode
                    temperature = gr.Slider(0.0, 1.0, value=handler.options.temperature, step=0.05,
                                            label="Temperature")
                    spoken = gr.Checkbox(False, label="Speak replies")
                    clear = gr.Button("Clear conversation")
                    # a button, not gr.Audio: gradio 5.50's audio box asks for an upload's progress with no
                    # upload id once its value is sent (a 404 and two console errors per upload)
                    upload = gr.UploadButton("No microphone? Send an audio file", file_types=["audio"],
                                             type="filepath", elem_id="upload")
                    last_turn = gr.Markdown(elem_id="last-turn")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(type="messages", height=560, label="Conversation", elem_id="conversation")
                typed = gr.Textbox(placeholder="Type a message and press Enter", label="Message", show_label=False,
                                   max_lines=4, max_length=handler.options.max_text_chars, elem_id="typed")
        gr.Markdown("The app's own API (WebSocket sessions, OpenAI-compatible routes): `docs/api.md` in the "
                    "repository.", elem_id="api-note")
        pages = PageConversations(engine, page_handler, calls)

        inputs = [microphone, key, mode, language, temperature, spoken]
        page_limit = None if time_limit is None else time_limit + 60  # fastrtc's own, silent: after the handler's
        microphone.stream(page_handler, inputs=inputs, outputs=[microphone], concurrency_limit=2 * concurrency_limit,
                          time_limit=page_limit)  # parked conversations hold slots: the engine refuses, in words
        # queued, so one generator streams every update (queue=False runs one step per trigger and drops triggers)
        microphone.on_additional_outputs(show, outputs=[chatbot, last_turn, voice],
                                         concurrency_limit=2 * concurrency_limit)
        mode.change(lambda mode: gr.update(visible=mode == "transcribe"), inputs=[mode], outputs=[language],
                    queue=False, show_progress="hidden")

        def clear_conversation(key):
            conversation = pages.live(key)
            if conversation is not None:
                conversation.post("clear")
            elif isinstance(key, PageKey) and (page := calls.take(key)) is not None:
                page.conversation.post("clear")
                pages.park(key, page)
            return [], ""

        clear.click(clear_conversation, inputs=[key], outputs=[chatbot, last_turn], queue=False)
        chatbot.clear(clear_conversation, inputs=[key], outputs=[chatbot, last_turn], queue=False)

        def replies(page: PageConversation):
            """The conversation's events as chat updates, until its turn's last one."""
            while True:
                try:
                    event = page.conversation.outbox.get(timeout=TURN_TIMEOUT_S)
                except queue.Empty:
                    gr.Warning("The reply took too long.")
                    return
                for output in page.view.render(event):
                    if not isinstance(output, Output):
                        if page.closed.is_set():
                            return
                        continue
                    yield show(output.history, output.status, output.final, output.state)
                    if output.final:  # between calls nothing listens (the state's own event waits for the next reader)
                        yield gr.skip(), gr.skip(), voice_state("")
                        return

        def between_calls(key: PageKey, post, request: gr.Request):
            """A typed or uploaded turn without a call: the page's conversation, out of the parking for
            its reply's updates, then back."""
            if request is not None and request.session_hash:
                pages.opened(request.session_hash, key)  # so that the page's unload closes it
            page = pages.take(key)
            if page is None:
                return
            try:
                post(page.conversation)
                yield from replies(page)
            finally:
                pages.park(key, page)

        def own_key(key) -> PageKey:
            """The page's key; a script's session (gradio's API: no page load) gets one here."""
            return key if isinstance(key, PageKey) else PageKey()

        def send_upload(path, key, mode, language, temperature, request: gr.Request):  # text replies
            key = own_key(key)
            try:  # refused from its header, then decoded in blocks: a small file cannot blow up in memory
                rate, samples = SAMPLE_RATE, decode_file(path, handler.options.max_audio_s)
            except (TypeError, RuntimeError, sf.LibsndfileError, AudioError) as error:  # no file, or not usable
                reason = str(error) if isinstance(error, AudioError) else type(error).__name__
                gr.Warning(f"That file could not be used as audio ({reason}).")
                yield gr.skip(), gr.skip(), gr.skip(), key
                return
            conversation = pages.live(key)
            if conversation is not None:  # the call's conversation: the reply comes with the call's updates
                conversation.post("audio", (rate, np.asarray(samples)))
                yield gr.skip(), gr.skip(), gr.skip(), key
                return

            def post(conversation):
                conversation.post("settings", settings_from_controls([mode, language, temperature, False]))
                conversation.post("audio", (rate, np.asarray(samples)))

            yield gr.skip(), gr.skip(), gr.skip(), key
            for update in between_calls(key, post, request):
                yield *update, gr.skip()

        upload.upload(send_upload, inputs=[upload, key, mode, language, temperature],
                   outputs=[chatbot, last_turn, voice, key], concurrency_limit=concurrency_limit,
                   api_name="send_upload")

        def send_text(text, key, mode, language, temperature, request: gr.Request):
            """A typed turn joins the page's conversation: the call's (its reply streams with the call's
            updates) or, between calls, the parked one."""
            key = own_key(key)
            if not isinstance(text, str) or not text.strip():
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), key
                return
            if len(text) > handler.options.max_text_chars:  # the box stops typing there; a script may not
                gr.Warning(f"A message can have at most {handler.options.max_text_chars} characters.")
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), key
                return
            conversation = pages.live(key)
            if conversation is not None:
                conversation.post("text", text)
                yield gr.skip(), gr.skip(), gr.skip(), "", key
                return

            def post(conversation):
                conversation.post("settings", settings_from_controls([mode, language, temperature, False]))
                conversation.post("text", text)

            yield gr.skip(), gr.skip(), gr.skip(), "", key
            for update in between_calls(key, post, request):
                yield *update, gr.skip(), gr.skip()

        typed.submit(send_text, inputs=[typed, key, mode, language, temperature],
                     outputs=[chatbot, last_turn, voice, typed, key], concurrency_limit=concurrency_limit)

        def page_opened(request: gr.Request) -> PageKey:
            key = PageKey()
            if request is not None and request.session_hash:
                pages.opened(request.session_hash, key)
            return key

        def page_closed(request: gr.Request):
            pages.closed(request.session_hash)

        demo.load(page_opened, outputs=[key], queue=False)
        demo.unload(page_closed)

        def tick() -> str:
            parking.sweep()  # conversations nobody came back to free their slots
            return engine_status(engine)

        gr.Timer(2.0).tick(tick, outputs=status, queue=False, show_progress="hidden")
        demo.conversations = pages  # for tests
        demo.parking, demo.page_calls = parking, calls  # ended and closed at shutdown (app.py)
    demo.show_api = False  # gradio's API page lists the page's internal events; the app's API is docs/api.md
    return demo
