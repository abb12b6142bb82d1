"""Voxtral realtime: talk to Voxtral-Mini-3B from a browser, a WebSocket client or a phone.

    python app.py                          # downloads mistralai/Voxtral-Mini-3B-2507 once, serves :7860
    python app.py --model models/voxtral   # a local checkpoint (or VOXTRAL_MODEL=...)
    python app.py --share                  # also a public Gradio link

Each option can also come from the environment variables named in its [env: ...]; a flag wins.
"""

import argparse
import logging
import os
import signal
import socket
import sys
from ipaddress import ip_network

from voxtral_app.cli import (
    EnvParser,
    audio_turns,
    backend_url,
    log_level,
    port,
    reply_tokens,
    seconds,
    sessions,
    switch,
    temperature,
)
from voxtral_app.serving.ice import (
    PROVIDERS,
    IceOptions,
    missing_credentials,
    rtc_configuration,
)

# torch, transformers, gradio and fastrtc are imported in main(), after the arguments: --help answers at once
WS_MAX_BYTES = 2 * 1_048_576  # uvicorn reads no WebSocket message bigger than this (the routes cap lower)
GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM, open streams get this long before they are cut
CHATTY = ("aiortc", "aioice", "fastrtc", "gradio", "httpx", "mistral_common", "websockets")  # at WARNING unless DEBUG


def parse_args(argv=None, environ=None) -> argparse.Namespace:
    parser = EnvParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, environ=environ)
    add = parser.add_argument
    add("--model", env=("VOXTRAL_MODEL", "MODEL_NAME"), help="hub id or local checkpoint directory (default: "
        "mistralai/Voxtral-Mini-3B-2507; 'tiny-random': a tiny untrained model)")
    # where replies are generated: this process, or an OpenAI-compatible server (vLLM, another copy of this app)
    add("--backend", default="local", choices=["local", "openai"], env=("VOXTRAL_BACKEND",),
        help="local: the model in this process; openai: stream from --backend-url")
    add("--backend-url", type=backend_url, env=("VOXTRAL_BACKEND_URL",), help="e.g. http://vllm:8000/v1")
    add("--backend-api-key", env=("VOXTRAL_BACKEND_API_KEY",), help="the server's API key, if it wants one")
    add("--backend-model", env=("VOXTRAL_BACKEND_MODEL",), help="model id there (default: the first it lists)")
    add("--device", default="auto", env=("VOXTRAL_DEVICE", "DEVICE"), help="auto, cuda, cuda:1 or cpu")
    add("--compile", action=argparse.BooleanOptionalAction, env=("VOXTRAL_COMPILE", "ENABLE_TORCH_COMPILE"),
        env_type=switch, help="torch.compile the hot path (default: on with CUDA, off on CPU)")
    add("--model-process", action=argparse.BooleanOptionalAction, default=True, env=("VOXTRAL_MODEL_PROCESS",),
        env_type=switch, help="run the model in a process of its own, so decoding does not wait for the audio "
        "threads' GIL (default: on)")
    add("--max-sessions", type=sessions, default=8, env=("VOXTRAL_MAX_SESSIONS", "MAX_BATCH_SIZE"),
        help="conversations at once (browser, WebSocket and phone together)")
    add("--session-time-limit", type=seconds, default=900, env=("VOXTRAL_SESSION_TIME_LIMIT",),
        help="seconds a connection may last (0: no limit)")
    add("--resume-s", type=seconds, default=120, env=("VOXTRAL_RESUME_S",),
        help="seconds a conversation outlives its dropped connection (a session socket, a page's call), for a "
        "reconnect or the page's next Start (0: off)")
    add("--kv-slots", type=sessions, env=("VOXTRAL_KV_SLOTS",),
        help="conversations whose KV cache stays on the device (default: --max-sessions); with fewer, idle "
        "conversations move to host memory and back")
    add("--kv-host-gb", type=seconds, default=8.0, env=("VOXTRAL_KV_HOST_GB",),
        help="host memory for KV caches moved off the device, GB; past it a returning conversation is prefilled "
        "again from its history")
    add("--pause-ms", type=seconds, env=("VOXTRAL_PAUSE_MS",), help="silence that ends a turn (default: 128)")
    add("--temperature", type=temperature, env=("VOXTRAL_TEMPERATURE", "TEMPERATURE"),
        help="chat temperature a conversation starts with (default: 0.2)")
    add("--reply-tokens", type=reply_tokens, env=("VOXTRAL_REPLY_TOKENS", "MAX_NEW_TOKENS"),
        help="longest chat reply, in tokens (default: 512)")
    add("--audio-turns", type=audio_turns, default=3, env=("VOXTRAL_AUDIO_TURNS",),
        help="spoken turns a prompt keeps as audio, 1-5; older ones go as their transcripts (vLLM takes at most 5)")
    add("--captions", action=argparse.BooleanOptionalAction, default=True, env_type=switch, env=("VOXTRAL_CAPTIONS",),
        help="show what Voxtral heard under each spoken turn, transcribed beside the reply (default: on; the "
        "transcript is also what the turn becomes once it ages out of the prompt, see --audio-turns)")
    # turn-taking: VAD, noise suppression / gain before it, Smart Turn at the pause
    add("--vad", default="silero", choices=("silero", "webrtc", "energy"), env=("VAD",),
        help="voice activity detector (VAD_AGGRESSIVENESS=0-3 for webrtc)")
    add("--noise-reduction", action=argparse.BooleanOptionalAction, default=False, env_type=switch,
        env=("ENABLE_NOISE_REDUCTION",), help="WebRTC noise suppression before the VAD and Voxtral")
    add("--auto-gain", action=argparse.BooleanOptionalAction, default=False, env_type=switch,
        env=("ENABLE_AUTO_GAIN",), help="WebRTC automatic gain control before the VAD and Voxtral")
    add("--end-of-turn", action=argparse.BooleanOptionalAction, env_type=switch, env=("ENABLE_END_OF_TURN",),
        help="Smart Turn decides at each pause whether the person has finished (default: on when the model runs "
        "on a GPU or a remote backend; off when it shares this machine's CPU, where Smart Turn's ~0.1 s of CPU "
        "per pause slows every turn, see docs/turn-taking.md)")
    add("--voice", default="auto", choices=["auto", "kokoro", "espeak"], env=("VOXTRAL_VOICE",),
        help="text-to-speech for spoken replies")
    add("--auth-token", env=("VOXTRAL_AUTH_TOKEN",),
        help="require this token: `Authorization: Bearer <token>` on the APIs, the password on the page")
    add("--opens-per-minute", type=int, default=30, env=("VOXTRAL_OPENS_PER_MINUTE",),
        help="offers, socket opens and /v1 requests one client address may make per minute (0: no limit; "
             "loopback is exempt)")
    add("--v1-in-flight", type=int, default=2, env=("VOXTRAL_V1_IN_FLIGHT",),
        help="/v1 chat and transcription requests one client address may have in flight (0: no limit; loopback "
             "and --front-end-ips are exempt)")
    add("--front-end-ips", default="", env=("VOXTRAL_FRONT_END_IPS",),
        help="your own front ends (addresses or networks, comma-separated) that send many people's turns to this "
             "server's /v1 (--backend openai): exempt from the per-address limits, as loopback is")
    add("--forwarded-allow-ips", env=("VOXTRAL_FORWARDED_ALLOW_IPS",),
        help="proxies (addresses or networks, comma-separated; '*': any) whose X-Forwarded-For names the client, "
             "for the rate limits (default: 127.0.0.1,::1; on a Hugging Face Space, whose proxy is the only way in: *)")
    add("--twilio-auth-token", env=("TWILIO_AUTH_TOKEN",),
        help="check Twilio's request signature on /telephone/incoming")
    add("--turn-url", env=("VOXTRAL_TURN_URL",),
        help="your TURN server for WebRTC, e.g. turn:turn.example.com:3478")
    add("--turn-username", env=("VOXTRAL_TURN_USERNAME",))
    add("--turn-credential", env=("VOXTRAL_TURN_CREDENTIAL",))
    add("--rtc-configuration", env=("VOXTRAL_RTC_CONFIGURATION",),
        help='the browser\'s RTCConfiguration as JSON: {"iceServers": [...]}')
    add("--turn-provider", choices=PROVIDERS, env=("VOXTRAL_TURN_PROVIDER",),
        help="TURN credentials from a service, via fastrtc (on a Hugging Face Space: cloudflare, with HF_TOKEN)")
    add("--host", default="127.0.0.1", env=("HOST", "GRADIO_SERVER_NAME"),
        help="0.0.0.0: reachable from other machines")
    add("--port", type=port, default=7860, env=("PORT", "GRADIO_SERVER_PORT"))
    add("--log-level", type=log_level, default="INFO", env=("LOG_LEVEL",), help="DEBUG, INFO, WARNING or ERROR")
    add("--debug", action="store_true", help="log everything, libraries included (same as --log-level DEBUG)")
    add("--share", action="store_true", help="also serve through a public Gradio link")
    args = parser.parse_args(argv)
    args.log_level = "DEBUG" if args.debug else args.log_level
    if args.forwarded_allow_ips is None:
        args.forwarded_allow_ips = "*" if parser.environ.get("SPACE_ID") else "127.0.0.1,::1"
    for flag, value in (("--front-end-ips", args.front_end_ips), ("--forwarded-allow-ips", args.forwarded_allow_ips)):
        try:
            [ip_network(item, strict=False) for item in addresses(value) if item != "*"]
        except ValueError as error:
            parser.error(f"{flag}: {error}")
    if args.backend == "openai" and not args.backend_url:
        parser.error("--backend openai needs --backend-url (or VOXTRAL_BACKEND_URL), e.g. http://vllm:8000/v1")
    args.ice = IceOptions(args.turn_url, args.turn_username, args.turn_credential, args.rtc_configuration,
                          args.turn_provider)
    try:
        args.rtc_configuration = rtc_configuration(args.ice, parser.environ)
    except ValueError as error:
        parser.error(str(error))
    return args


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # one line per turn from us; the libraries only when something is wrong
        for name in CHATTY:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def port_taken(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port, found now rather than after minutes of model loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            probe.bind(address)
    except socket.gaierror as error:
        return f"cannot listen on {host}: {error.strerror}: change --host (or HOST / GRADIO_SERVER_NAME)"
    except OSError as error:
        return (f"cannot listen on {host}:{port} ({error.strerror or error}): choose another port with --port "
                "(or PORT / GRADIO_SERVER_PORT), or stop what holds it")
    return None


def steady_memory() -> None:
    """glibc raises its mmap threshold each time a big buffer is freed; after that, every turn's few MB
    of audio and log-mel buffers come from the heap and fragment it: the server's RSS grew ~4 MB per
    turn without end (bench/soak.py). A fixed threshold keeps big buffers in mmap, returned when freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD = 128 kB, and no adjusting it
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def fair_gil() -> None:
    """Hand the GIL over every 0.5 ms instead of every 5 ms. The decode thread lets go of it in every
    torch op and must then wait for it; behind the event loop's Python (aiortc, 8 connections) each
    wait lasted up to 5 ms, and a 15 ms decode step took 150 ms (`python bench/gil.py`)."""
    sys.setswitchinterval(0.0005)


def light_torch(model_process: bool) -> None:
    """With the model in its own process (log-mel features included), this one runs only small torch
    ops per turn (sampling a first token): one thread, so no op waits at OpenMP's barrier for a core
    the audio threads hold."""
    import torch

    if model_process:
        torch.set_num_threads(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    steady_memory()
    fair_gil()
    configure_logging(args.log_level)
    if problem := missing_credentials(args.ice):
        logging.getLogger("app").warning(problem)
    if problem := port_taken(args.host, args.port):
        sys.exit(f"error: {problem}")

    import uvicorn

    from voxtral_app import compat

    try:  # before anything imports a library whose internals the app reaches: fail here, with the fix
        compat.check_versions()
    except RuntimeError as problem:
        sys.exit(f"error: {problem}")

    from voxtral_app.conversation.speech import VoiceOptions, load_speaker_or_none
    from voxtral_app.model.engine import EngineOptions
    from voxtral_app.model.loading import ModelLoadError, load_engine
    from voxtral_app.serving.app import ServerOptions, create_app
    from voxtral_app.serving.guard import GuardOptions
    from voxtral_app.serving.session_api import SessionOptions

    light_torch(args.backend == "openai" or args.model_process)
    if args.backend == "openai":
        engine = open_backend(args)
    else:
        try:
            engine = load_engine(EngineOptions(**given(model=args.model), device=args.device, compile=args.compile,
                                               slots=args.max_sessions, kv_slots=args.kv_slots,
                                               kv_host_gb=args.kv_host_gb, model_process=args.model_process,
                                               audio_turns=args.audio_turns),
                                 background_warmup=True,
                                 on_failure=stop_serving)
        except ModelLoadError as error:
            sys.exit(f"error: {error}")
    chat_options = conversation_options(args, engine)
    guard = GuardOptions(auth_token=args.auth_token or None, opens_per_minute=max(0, args.opens_per_minute),
                         generations_per_address=max(0, args.v1_in_flight), front_end_ips=addresses(args.front_end_ips),
                         forwarded_allow_ips=addresses(args.forwarded_allow_ips))
    server_options = ServerOptions(guard=guard, session_time_limit_s=args.session_time_limit or None,
                                   twilio_auth_token=args.twilio_auth_token, rtc_configuration=args.rtc_configuration,
                                   debug=args.log_level == "DEBUG", resume_s=args.resume_s,
                                   sessions=SessionOptions(resume_s=args.resume_s))
    app = create_app(engine, chat_options, server_options, speaker=load_speaker_or_none(VoiceOptions(engine=args.voice)))
    if args.share:
        # the page again on the next port, reachable through a gradio.live link
        app.state.ui.launch(share=True, prevent_thread_lock=True, server_port=args.port + 1)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), ws_max_size=WS_MAX_BYTES,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=args.log_level == "DEBUG",
                    loop="auto")  # uvloop (requirements.txt): WebRTC needs it, see voxtral_app/compat/fastrtc.py, event_loop_kind
    finally:
        engine.close()
    if engine.failure is not None:
        sys.exit(f"error: the decode thread died ({engine.failure}); exiting so a supervisor restarts the app")


def addresses(text: str) -> tuple[str, ...]:
    """A comma-separated list of addresses or networks -> its items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def given(**values) -> dict:
    """The options a flag or variable set (None: the option's own default)."""
    return {name: value for name, value in values.items() if value is not None}


def conversation_options(args: argparse.Namespace, engine):
    """What each conversation starts with: turn-taking (Smart Turn by where the model runs), the engine's
    audio cap and the chat settings given. The tests' servers are built with it too."""
    from voxtral_app.conversation.conversation import ConversationOptions

    turns = turn_options(args, given(pause_s=None if args.pause_ms is None else args.pause_ms / 1000),
                         end_of_turn=smart_turn_on(args.end_of_turn, engine.device_kind))
    return ConversationOptions(turns=turns, max_audio_s=engine.options.max_audio_s,
                               captions=args.captions is not False,
                               **given(temperature=args.temperature, reply_tokens=args.reply_tokens))


def smart_turn_on(choice: bool | None, device_kind: str) -> bool:
    """--end-of-turn, or by default (None): on unless the model runs on this machine's CPU. On a GPU or a remote
    backend the app's cores are free, and Smart Turn's decision (started at the first silent window) is done
    within the pause; next to a CPU model it competes with the audio encoder and prefill for the same cores."""
    return choice if choice is not None else device_kind != "cpu"


def turn_options(args: argparse.Namespace, given: dict, end_of_turn: bool):
    from dataclasses import replace

    from voxtral_app.audio.denoise import CleanOptions
    from voxtral_app.audio.vad import VadOptions
    from voxtral_app.turns.end_of_turn import EndOfTurnOptions, shared_model
    from voxtral_app.turns.taker import TurnOptions

    turns = TurnOptions(**given, vad=VadOptions(kind=args.vad, aggressiveness=int(os.environ.get("VAD_AGGRESSIVENESS", 2))),
                        cleaning=CleanOptions(noise_reduction=args.noise_reduction, auto_gain=args.auto_gain),
                        end_of_turn=EndOfTurnOptions(enabled=end_of_turn))
    if turns.end_of_turn.enabled:
        try:
            shared_model(turns.end_of_turn)  # load it now, not in the first turn
        except RuntimeError as error:  # the model file is optional: without it, every pause_s ends a turn
            logging.getLogger("app").warning("end-of-turn model off: %s", error)
            turns = replace(turns, end_of_turn=EndOfTurnOptions(enabled=False))
    return turns


def open_backend(args):
    """--backend openai: the server at --backend-url must answer GET /v1/models now (one-line error if not)."""
    from voxtral_app.backends.openai import (
        BackendUnavailable,
        OpenAIBackend,
        RemoteOptions,
    )

    backend = OpenAIBackend(RemoteOptions(url=args.backend_url, api_key=args.backend_api_key or "",
                                          model=args.backend_model or "", slots=args.max_sessions,
                                          audio_turns=args.audio_turns))
    try:
        return backend.connect()
    except BackendUnavailable as error:
        backend.close()
        sys.exit(f"app.py: error: --backend-url {args.backend_url}: {error}")


def stop_serving(error: BaseException) -> None:
    """The decode thread died: /health says degraded (503), turns fail with a message, and the process
    shuts down gracefully and exits non-zero, so Docker, Spaces or systemd restart it."""
    logging.getLogger("app").critical("the decode thread died (%s); shutting down", error)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
