"""The Gradio page: microphone (FastRTC WebRTC), chat, mode/language/temperature/voice controls,
clear, an upload path for people without a microphone, and the model's warm-up status."""

import logging
import queue
import threading

import gradio as gr
import numpy as np
from fastrtc import WebRTC

from . import transport
from .conversation import Conversation, Output, Settings
from .engine import EngineBusy, EngineFailed
from .handler import VoxtralHandler

logger = logging.getLogger(__name__)

LANGUAGES = ["auto", "en", "fr", "de", "es", "it", "pt", "nl", "hi"]  # Voxtral's languages


def engine_status(engine) -> str:
    where = f"`{engine.options.model}` on {engine.device.type}" + (" (compiled)" if engine.decoder.compiled else "")
    busy = f"{engine.active_chats}/{engine.options.slots} conversations"
    if not engine.ready.is_set():
        return f"⏳ Warming up {where}… replies start once it is ready."
    return f"✅ Ready: {where} · {busy}"


def show(history, status):
    """AdditionalOutputs(history, status) -> chatbot and the turn line."""
    if status.get("error"):
        gr.Warning(status["error"])
    return history, turn_line(status)


def turn_line(status: dict) -> str:
    if status.get("first_token_ms") is None:
        return ""
    return (f"Last turn: {status['first_token_ms']} ms from end of speech to first token "
            f"(pause {status['pause_ms']} ms) · {status['tokens_per_s']} tok/s · "
            f"{status['prefill_tokens']} new / {status['cached_tokens']} cached prompt tokens")


def webrtc_id(value) -> str | None:
    value = getattr(value, "webrtc_id", value)
    return value if isinstance(value, str) and value else None


UPLOAD_TURN_TIMEOUT_S = 600.0  # an uploaded turn's reply must finish within this


class Uploads:
    """The upload box's conversations, one per page session (Gradio's session_hash). Each takes a
    KV-cache slot like a microphone connection, and is closed when its page unloads (or, as a
    backstop, after the conversation's idle timeout). `conversations` is guarded by `lock`."""

    def __init__(self, engine, handler: VoxtralHandler):
        self.engine = engine
        self.handler = handler
        self.lock = threading.Lock()
        self.conversations: dict[str, Conversation] = {}

    def get(self, session: str) -> Conversation | None:
        with self.lock:
            conversation = self.conversations.get(session)
            if conversation is not None and conversation.closed.is_set():
                del self.conversations[session]
                conversation = None
            return conversation

    def open(self, session: str) -> Conversation:
        conversation = self.get(session)
        if conversation is None:
            options = self.handler.options
            conversation = Conversation(self.engine, options, self.handler.speaker,
                                        Settings(temperature=options.temperature), name="ui_upload")
            conversation.open()  # EngineBusy when every slot is taken
            with self.lock:
                self.conversations[session] = conversation
        return conversation

    def close(self, session: str) -> None:
        with self.lock:
            conversation = self.conversations.pop(session, None)
        if conversation is not None:
            conversation.close()


def build_ui(engine, handler: VoxtralHandler, concurrency_limit: int, time_limit: float | None,
             rtc_configuration=None) -> gr.Blocks:
    with gr.Blocks(title="Voxtral realtime") as demo:
        gr.Markdown("# Voxtral realtime\nClick the microphone, speak, and pause: Voxtral answers as soon as "
                    "you stop. Speak over a reply to interrupt it.")
        status = gr.Markdown(engine_status(engine))
        with gr.Row():
            with gr.Column(scale=1):
                microphone = WebRTC(modality="audio", mode="send-receive", label="Microphone", full_screen=False,
                                    rtc_configuration=rtc_configuration)  # full screen: fixed over the page
                mode = gr.Radio(["chat", "transcribe"], value="chat", label="Mode")
                language = gr.Dropdown(LANGUAGES, value="auto", label="Transcription language")
                temperature = gr.Slider(0.0, 1.0, value=handler.options.temperature, step=0.05, label="Temperature")
                spoken = gr.Checkbox(False, label="Speak replies")
                clear = gr.Button("Clear conversation")
                with gr.Accordion("No microphone? Upload audio", open=False):
                    upload = gr.Audio(sources=["upload"], type="numpy", label="Audio file")
                    send = gr.Button("Send")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(type="messages", height=560, label="Conversation")
                last_turn = gr.Markdown()
        uploads = Uploads(engine, handler)

        inputs = [microphone, mode, language, temperature, spoken]
        microphone.stream(handler, inputs=inputs, outputs=[microphone], concurrency_limit=concurrency_limit,
                          time_limit=time_limit)
        # queued, so one generator streams every update (queue=False runs one step per trigger and drops triggers)
        microphone.on_additional_outputs(show, outputs=[chatbot, last_turn], concurrency_limit=concurrency_limit)

        def clear_conversation(value, request: gr.Request):
            live = transport.live_handler(microphone, webrtc_id(value) or "")
            for conversation in (getattr(live, "conversation", None), uploads.get(request.session_hash)):
                if conversation is not None:
                    conversation.post("clear")
            return [], ""

        clear.click(clear_conversation, inputs=[microphone], outputs=[chatbot, last_turn], queue=False)
        chatbot.clear(clear_conversation, inputs=[microphone], outputs=[chatbot, last_turn], queue=False)

        def send_upload(audio, mode, language, temperature, request: gr.Request):  # uploads get text replies
            if audio is None:
                gr.Warning("Choose an audio file first.")
                yield gr.skip(), gr.skip()
                return
            try:
                conversation = uploads.open(request.session_hash)
            except (EngineBusy, EngineFailed) as error:
                gr.Warning(f"The server is busy ({error}). Please try again in a minute.")
                yield gr.skip(), gr.skip()
                return
            rate, samples = audio
            conversation.post("settings", Settings.from_values([mode, language, temperature, False]))
            conversation.post("audio", (rate, np.asarray(samples)))
            while True:
                try:
                    output = conversation.outbox.get(timeout=UPLOAD_TURN_TIMEOUT_S)
                except queue.Empty:
                    gr.Warning("The reply took too long.")
                    return
                if not isinstance(output, Output):
                    if conversation.closed.is_set():
                        return
                    continue
                yield show(output.history, output.status)
                if output.final:
                    return

        send.click(send_upload, inputs=[upload, mode, language, temperature], outputs=[chatbot, last_turn],
                   concurrency_limit=concurrency_limit)
        def page_closed(request: gr.Request):
            uploads.close(request.session_hash)

        demo.unload(page_closed)
        demo.uploads = uploads  # for tests
        gr.Timer(2.0).tick(lambda: engine_status(engine), outputs=status, queue=False, show_progress="hidden")
    return demo
