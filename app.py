"""Voxtral realtime: talk to Voxtral-Mini-3B from a browser, a WebSocket client or a phone.

    python app.py                          # downloads mistralai/Voxtral-Mini-3B-2507 once, serves :7860
    python app.py --model models/voxtral   # a local checkpoint (or VOXTRAL_MODEL=...)
    python app.py --share                  # also a public Gradio link
"""

import argparse
import logging
import os
import sys

import uvicorn

from voxtral_app.chat import ChatOptions
from voxtral_app.engine import DEFAULT_MODEL, EngineOptions, ModelLoadError, load_engine
from voxtral_app.server import ServerOptions, create_app
from voxtral_app.tts import VoiceOptions, load_speaker
from voxtral_app.denoise import CleanOptions
from voxtral_app.endpoint import EndOfTurnOptions, shared_model
from voxtral_app.turn import TurnOptions
from voxtral_app.vad import KINDS, VadOptions


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=env("VOXTRAL_MODEL", DEFAULT_MODEL),
                        help="hub id or local checkpoint directory ('tiny-random': a tiny untrained model)")
    parser.add_argument("--device", default=env("VOXTRAL_DEVICE", "auto"), help="auto, cuda, cuda:1 or cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the hot path (default: on with CUDA, off on CPU)")
    parser.add_argument("--max-sessions", type=int, default=int(env("VOXTRAL_MAX_SESSIONS", 8)),
                        help="conversations at once (browser, WebSocket and phone together)")
    parser.add_argument("--session-time-limit", type=float, default=float(env("VOXTRAL_SESSION_TIME_LIMIT", 900)),
                        help="seconds a connection may last (0: no limit)")
    parser.add_argument("--pause-ms", type=float, default=TurnOptions.pause_s * 1000,
                        help="silence that ends a turn")
    # turn-taking: VAD, noise suppression / gain before it, Smart Turn at the pause
    on = lambda name, default="0": env(name, default).lower() in ("1", "true", "yes", "on")  # noqa: E731
    parser.add_argument("--vad", default=env("VAD", "silero"), choices=KINDS, help="voice activity detector "
                        "(env VAD; VAD_AGGRESSIVENESS=0-3 for webrtc)")
    parser.add_argument("--noise-reduction", action=argparse.BooleanOptionalAction,
                        default=on("ENABLE_NOISE_REDUCTION"), help="WebRTC noise suppression before the VAD and Voxtral")
    parser.add_argument("--auto-gain", action=argparse.BooleanOptionalAction, default=on("ENABLE_AUTO_GAIN"),
                        help="WebRTC automatic gain control before the VAD and Voxtral")
    parser.add_argument("--end-of-turn", action=argparse.BooleanOptionalAction, default=on("ENABLE_END_OF_TURN", "1"),
                        help="Smart Turn decides at each pause whether the person has finished")
    parser.add_argument("--voice", default=env("VOXTRAL_VOICE", "auto"), choices=["auto", "kokoro", "espeak"],
                        help="text-to-speech for spoken replies")
    parser.add_argument("--twilio-auth-token", default=env("TWILIO_AUTH_TOKEN"),
                        help="check Twilio's request signature on /telephone/incoming")
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    return parser.parse_args(argv)


def turn_options(args: argparse.Namespace) -> TurnOptions:
    turns = TurnOptions(pause_s=args.pause_ms / 1000,
                        vad=VadOptions(kind=args.vad, aggressiveness=int(os.environ.get("VAD_AGGRESSIVENESS", 2))),
                        cleaning=CleanOptions(noise_reduction=args.noise_reduction, auto_gain=args.auto_gain),
                        end_of_turn=EndOfTurnOptions(enabled=args.end_of_turn))
    if turns.end_of_turn.enabled:
        shared_model(turns.end_of_turn)  # load it now: a missing model file stops the start with what to do
    return turns


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = load_engine(EngineOptions(model=args.model, device=args.device, compile=args.compile,
                                           slots=args.max_sessions), background_warmup=True)
    except ModelLoadError as error:
        sys.exit(f"error: {error}")
    chat_options = ChatOptions(turns=turn_options(args), max_audio_s=engine.options.max_audio_s)
    server_options = ServerOptions(session_time_limit_s=args.session_time_limit or None,
                                   twilio_auth_token=args.twilio_auth_token)
    app = create_app(engine, chat_options, server_options, speaker=load_speaker(VoiceOptions(engine=args.voice)))
    if args.share:
        # the page again on the next port, reachable through a gradio.live link
        app.state.ui.launch(share=True, prevent_thread_lock=True, server_port=args.port + 1)
    try:
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
