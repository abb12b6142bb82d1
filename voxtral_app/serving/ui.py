"""The Gradio page: microphone (FastRTC WebRTC), chat, a text box, mode/language/temperature/voice
controls, clear, an upload path for people without a microphone, and the model's warm-up status."""

import logging
import queue
import threading

import gradio as gr
import numpy as np
from fastrtc import WebRTC

from ..backends.contract import EngineBusy, EngineFailed
from ..compat import fastrtc as compat
from ..conversation.conversation import Conversation, Settings
from . import metrics
from .chat_view import ChatView, Output, reply_kind
from .handler import VoxtralHandler, settings_from_controls

logger = logging.getLogger(__name__)

LANGUAGES = ["auto", "en", "fr", "de", "es", "it", "pt", "nl", "hi"]  # Voxtral's languages

# The browser snippets below are written against fastrtc 0.0.34's component (its DOM and its logging);
# voxtral_app/compat/fastrtc.py refuses any other fastrtc version at import.
# fastrtc's WebRTC component logs every data-channel message and connection state change: 3 lines per
# chat update (83 lines in 30 s with one short reply from the tiny model; hundreds with real replies).
# The page keeps warnings and errors; `python app.py --debug` keeps all.
QUIET_CONSOLE = """<script>
for (const level of ["log", "debug", "info"]) console[level] = () => {};
</script>"""
# The page works offline: fastrtc's microphone fetches a notification sound from huggingface.co on
# every page load (for stop words, which this app does not use), so remote sounds are not loaded.
OFFLINE = """<script>
const LocalAudio = window.Audio;
window.Audio = function (src) { return new LocalAudio(/^https?:/.test(src || "") ? undefined : src); };
window.Audio.prototype = LocalAudio.prototype;
</script>"""
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"])  # not Google Fonts: offline

# One click starts talking. fastrtc's microphone first shows a "Click to Access Microphone" button and,
# once the browser grants the microphone, a record button: that first button is renamed "Start talking",
# and the record button (fastrtc's button_labels: "Start talking" too) is pressed for the person as soon
# as it appears after their click. The click is the user gesture the browser needs for the microphone.
ONE_CLICK = """() => {
  const microphone = document.getElementById("microphone");
  if (!microphone) return;
  let clicked = false;
  const tidy = () => {
    const ask = microphone.querySelector('[title="grant webcam access"] button');
    if (ask && !ask.dataset.oneClick) {
      ask.dataset.oneClick = "1";
      const texts = document.createTreeWalker(ask, NodeFilter.SHOW_TEXT);
      for (let node; (node = texts.nextNode());) if (node.data.trim()) node.data = "Start talking";
      ask.addEventListener("click", () => { clicked = true; });
    }
    const record = microphone.querySelector('button[aria-label="start stream"]');
    if (clicked && record) {
      clicked = false;
      record.click();
    }
  };
  new MutationObserver(tidy).observe(microphone, {childList: true, subtree: true});
  tidy();
}"""
BUTTON_LABELS = {"start": "Start talking", "stop": "Stop", "waiting": "Connecting…"}


def engine_status(engine) -> str:
    where = f"`{engine.options.model}` on {engine.device_kind}" + (" (compiled)" if engine.compiled else "")
    busy = f"{engine.active_chats}/{engine.options.slots} conversations"
    if not engine.ready.is_set():
        return f"⏳ Warming up {where}… replies start once it is ready."
    return f"✅ Ready: {where} · {busy}"


def show(history, status, final=False):
    """AdditionalOutputs(history, status, final) -> chatbot and the turn line."""
    if status.get("error"):
        gr.Warning(status["error"])
    return history, turn_line(status)


def turn_line(status: dict) -> str:
    if status.get("first_token_ms") is None:
        return ""
    return (f"{reply_kind(status['mode'], status.get('language', ''))}: {status['first_token_ms']} ms from end "
            f"of speech to first token "
            f"(pause {status['pause_ms']} ms) · {status['tokens_per_s']} tok/s · "
            f"{status['prefill_tokens']} new / {status['cached_tokens']} cached prompt tokens")


def webrtc_id(value) -> str | None:
    value = getattr(value, "webrtc_id", value)
    return value if isinstance(value, str) and value else None


UPLOAD_TURN_TIMEOUT_S = 600.0  # an uploaded turn's reply must finish within this


class Uploads:
    """The upload box's conversations, one per page session (Gradio's session_hash). Each takes a
    KV-cache slot like a microphone connection, and is closed when its page unloads (or, as a
    backstop, after the conversation's idle timeout). `conversations` (each with its ChatView, used by
    the one request that streams its reply at a time) is guarded by `lock`."""

    def __init__(self, engine, handler: VoxtralHandler):
        self.engine = engine
        self.handler = handler
        self.lock = threading.Lock()
        self.conversations: dict[str, tuple[Conversation, ChatView]] = {}

    def get(self, session: str) -> tuple[Conversation, ChatView] | None:
        with self.lock:
            entry = self.conversations.get(session)
            if entry is not None and entry[0].closed.is_set():
                del self.conversations[session]
                entry = None
            return entry

    def open(self, session: str) -> tuple[Conversation, ChatView]:
        entry = self.get(session)
        if entry is None:
            options = self.handler.options
            conversation = Conversation(self.engine, options, self.handler.speaker,
                                        Settings(temperature=options.temperature), name="ui_upload",
                                        listener=metrics.conversation_event)
            conversation.open()  # EngineBusy when every slot is taken
            entry = (conversation, ChatView(options, "ui_upload"))
            with self.lock:
                self.conversations[session] = entry
        return entry

    def close(self, session: str) -> None:
        with self.lock:
            entry = self.conversations.pop(session, None)
        if entry is not None:
            entry[0].close()


def build_ui(engine, handler: VoxtralHandler, concurrency_limit: int, time_limit: float | None,
             rtc_configuration=None, debug: bool = False) -> gr.Blocks:
    """`debug`: keep the browser console's chatter (fastrtc logs every message)."""
    head = OFFLINE + ("" if debug else QUIET_CONSOLE)
    with gr.Blocks(title="Voxtral realtime", theme=THEME, head=head, js=ONE_CLICK,
                   delete_cache=(900, 3600)) as demo:  # the chat's copies of clips and uploads: an hour
        gr.Markdown("# Voxtral realtime\nClick **Start talking**, speak, and pause: Voxtral answers as soon as "
                    "you stop. Speak over a reply to interrupt it, or type below the conversation.")
        status = gr.Markdown(engine_status(engine))
        with gr.Row():
            with gr.Column(scale=1):
                microphone = WebRTC(modality="audio", mode="send-receive", label="Microphone", full_screen=False,
                                    rtc_configuration=rtc_configuration, button_labels=BUTTON_LABELS,
                                    elem_id="microphone")  # full screen: fixed over the page
                mode = gr.Radio(["chat", "transcribe"], value="chat", label="Mode", elem_id="mode",
                                info="chat: Voxtral answers · transcribe: Voxtral writes down what you said")
                language = gr.Dropdown(LANGUAGES, value="auto", label="Transcription language", visible=False,
                                       elem_id="language")  # shown in transcribe mode
                temperature = gr.Slider(0.0, 1.0, value=handler.options.temperature, step=0.05, label="Temperature")
                spoken = gr.Checkbox(False, label="Speak replies")
                clear = gr.Button("Clear conversation")
                with gr.Accordion("No microphone? Upload audio", open=False):
                    upload = gr.Audio(sources=["upload"], type="numpy", label="Audio file")
                    send = gr.Button("Send")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(type="messages", height=560, label="Conversation", elem_id="conversation")
                typed = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, max_lines=4,
                                   max_length=handler.options.max_text_chars, elem_id="typed")
                last_turn = gr.Markdown()
        uploads = Uploads(engine, handler)

        inputs = [microphone, mode, language, temperature, spoken]
        microphone.stream(handler, inputs=inputs, outputs=[microphone], concurrency_limit=concurrency_limit,
                          time_limit=time_limit)
        # queued, so one generator streams every update (queue=False runs one step per trigger and drops triggers)
        microphone.on_additional_outputs(show, outputs=[chatbot, last_turn], concurrency_limit=concurrency_limit)
        mode.change(lambda mode: gr.update(visible=mode == "transcribe"), inputs=[mode], outputs=[language],
                    queue=False, show_progress="hidden")

        def live_conversation(value) -> Conversation | None:
            conversation = getattr(compat.live_handler(microphone, webrtc_id(value) or ""), "conversation", None)
            return None if conversation is None or conversation.closed.is_set() else conversation

        def clear_conversation(value, request: gr.Request):
            upload = uploads.get(request.session_hash)
            for conversation in (live_conversation(value), upload and upload[0]):
                if conversation is not None:
                    conversation.post("clear")
            return [], ""

        clear.click(clear_conversation, inputs=[microphone], outputs=[chatbot, last_turn], queue=False)
        chatbot.clear(clear_conversation, inputs=[microphone], outputs=[chatbot, last_turn], queue=False)

        def upload_conversation(session: str) -> tuple[Conversation, ChatView] | None:
            try:
                return uploads.open(session)
            except (EngineBusy, EngineFailed) as error:
                gr.Warning(f"The server is busy ({error}). Please try again in a minute.")
                return None

        def replies(conversation: Conversation, view: ChatView):
            """The conversation's events as chat updates, until its turn's last one."""
            while True:
                try:
                    event = conversation.outbox.get(timeout=UPLOAD_TURN_TIMEOUT_S)
                except queue.Empty:
                    gr.Warning("The reply took too long.")
                    return
                for output in view.render(event):
                    if not isinstance(output, Output):
                        if conversation.closed.is_set():
                            return
                        continue
                    yield show(output.history, output.status)
                    if output.final:
                        return

        def send_upload(audio, mode, language, temperature, request: gr.Request):  # uploads get text replies
            if audio is None:
                gr.Warning("Choose an audio file first.")
                yield gr.skip(), gr.skip()
                return
            upload = upload_conversation(request.session_hash)
            if upload is None:
                yield gr.skip(), gr.skip()
                return
            conversation, view = upload
            rate, samples = audio
            conversation.post("settings", settings_from_controls([mode, language, temperature, False]))
            conversation.post("audio", (rate, np.asarray(samples)))
            yield from replies(conversation, view)

        send.click(send_upload, inputs=[upload, mode, language, temperature], outputs=[chatbot, last_turn],
                   concurrency_limit=concurrency_limit)

        def send_text(text, value, mode, language, temperature, request: gr.Request):
            """A typed turn joins the microphone's conversation (same chat, same KV cache; the reply streams
            through on_additional_outputs), or without a microphone connection the upload box's."""
            if not isinstance(text, str) or not text.strip():
                yield gr.skip(), gr.skip(), gr.skip()
                return
            if len(text) > handler.options.max_text_chars:  # the box stops typing there; a script may not
                gr.Warning(f"A message can have at most {handler.options.max_text_chars} characters.")
                yield gr.skip(), gr.skip(), gr.skip()
                return
            conversation = live_conversation(value)
            if conversation is not None:
                conversation.post("text", text)
                yield gr.skip(), gr.skip(), ""
                return
            upload = upload_conversation(request.session_hash)
            if upload is None:
                yield gr.skip(), gr.skip(), gr.skip()
                return
            conversation, view = upload
            conversation.post("settings", settings_from_controls([mode, language, temperature, False]))
            conversation.post("text", text)
            yield gr.skip(), gr.skip(), ""
            for history, line in replies(conversation, view):
                yield history, line, gr.skip()

        typed.submit(send_text, inputs=[typed, microphone, mode, language, temperature],
                     outputs=[chatbot, last_turn, typed], concurrency_limit=concurrency_limit)

        def page_closed(request: gr.Request):
            uploads.close(request.session_hash)

        demo.unload(page_closed)
        # gradio 5.50 decides whether the page keeps a heartbeat (without which unload never runs) from
        # its State components, and only unreliably from unload events: a State makes sure it does.
        gr.State(None)
        demo.uploads = uploads  # for tests
        gr.Timer(2.0).tick(lambda: engine_status(engine), outputs=status, queue=False, show_progress="hidden")
    return demo
