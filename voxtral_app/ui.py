"""The Gradio page: microphone (FastRTC WebRTC), chat, mode/language/temperature/voice controls,
clear, an upload path for people without a microphone, and the model's warm-up status."""

import logging

import gradio as gr
import numpy as np
from fastrtc import WebRTC

from .chat import Conversation, Settings, VoxtralHandler

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
    return getattr(value, "webrtc_id", value) or None


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
        uploads = gr.State(None, delete_callback=lambda conversation: conversation and conversation.close())

        inputs = [microphone, mode, language, temperature, spoken]
        microphone.stream(handler, inputs=inputs, outputs=[microphone], concurrency_limit=concurrency_limit,
                          time_limit=time_limit)
        # queued, so one generator streams every update (queue=False runs one step per trigger and drops triggers)
        microphone.on_additional_outputs(show, outputs=[chatbot, last_turn], concurrency_limit=concurrency_limit)

        def clear_conversation(value, conversation):
            live = microphone.handlers.get(webrtc_id(value) or "")
            for conv in (getattr(live, "conversation", None), conversation):
                if conv is not None:
                    conv.cancel()
                    conv.clear()
            return [], ""

        clear.click(clear_conversation, inputs=[microphone, uploads], outputs=[chatbot, last_turn], queue=False)

        def send_upload(audio, mode, language, temperature, conversation):  # uploads get text replies
            if audio is None:
                raise gr.Error("Choose an audio file first.")
            conversation = conversation or Conversation(engine, handler.options, handler.speaker)
            rate, samples = audio
            settings = Settings.from_values([mode, language, temperature, False])
            for output in conversation.respond(rate, np.asarray(samples), settings):
                outputs = output[1] if isinstance(output, tuple) else output
                history, line = show(*outputs.args)
                yield history, line, conversation

        send.click(send_upload, inputs=[upload, mode, language, temperature, uploads],
                   outputs=[chatbot, last_turn, uploads], concurrency_limit=concurrency_limit)
        gr.Timer(1.0).tick(lambda: engine_status(engine), outputs=status, queue=False, show_progress="hidden")
    return demo
