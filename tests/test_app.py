"""app.py's start: flags and environment variables, --help speed, binding, one-line errors."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

import app
from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.client import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "gradio", "fastrtc", "uvicorn", "aiortc")


def run_app(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_seed_environment_names_apply():
    args = app.parse_args([], environ={
        "MODEL_NAME": "models/voxtral", "DEVICE": "cpu", "ENABLE_TORCH_COMPILE": "false", "MAX_BATCH_SIZE": "3",
        "TEMPERATURE": "0.5", "HOST": "0.0.0.0", "PORT": "9000", "LOG_LEVEL": "warning"})
    assert (args.model, args.device, args.compile, args.max_sessions) == ("models/voxtral", "cpu", False, 3)
    assert (args.temperature, args.host, args.port, args.log_level) == (0.5, "0.0.0.0", 9000, "WARNING")


def test_defaults_without_environment():
    args = app.parse_args([], environ={})
    assert (args.model, args.device, args.compile, args.max_sessions) == (None, "auto", None, 8)
    assert (args.host, args.port, args.log_level, args.rtc_configuration) == ("127.0.0.1", 7860, "INFO", None)


def test_voxtral_names_and_gradio_names():
    args = app.parse_args([], environ={"VOXTRAL_MODEL": "a", "MODEL_NAME": "b", "VOXTRAL_MAX_SESSIONS": "2",
                                       "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (args.model, args.max_sessions, args.host, args.port) == ("a", 2, "0.0.0.0", 7861)
    assert app.parse_args([], environ={"HOST": "::1", "GRADIO_SERVER_NAME": "0.0.0.0"}).host == "::1"


def test_resume_and_kv_slot_settings():
    args = app.parse_args([], environ={})
    assert (args.resume_s, args.kv_slots, args.kv_host_gb) == (120, None, 8.0)  # kv_slots None: = --max-sessions
    args = app.parse_args(["--kv-slots", "4"], environ={"VOXTRAL_RESUME_S": "0", "VOXTRAL_KV_SLOTS": "2",
                                                        "VOXTRAL_KV_HOST_GB": "0.5"})
    assert (args.resume_s, args.kv_slots, args.kv_host_gb) == (0, 4, 0.5)
    with pytest.raises(SystemExit):
        app.parse_args(["--kv-slots", "0"], environ={})


def test_flags_beat_the_environment():
    environ = {"PORT": "9000", "MAX_BATCH_SIZE": "3", "ENABLE_TORCH_COMPILE": "true", "LOG_LEVEL": "ERROR",
               "TEMPERATURE": "0.9", "GRADIO_SERVER_NAME": "0.0.0.0"}
    args = app.parse_args(["--port", "8000", "--max-sessions", "5", "--no-compile", "--debug",
                           "--temperature", "0", "--host", "127.0.0.1"], environ=environ)
    assert (args.port, args.max_sessions, args.compile, args.log_level) == (8000, 5, False, "DEBUG")
    assert (args.temperature, args.host) == (0.0, "127.0.0.1")
    # an environment value a flag overrides is never read, so a stray bad one does not stop the start
    assert app.parse_args(["--port", "8000"], environ={"PORT": "abc"}).port == 8000


def test_turn_settings_from_the_environment():
    args = app.parse_args([], environ={"VOXTRAL_TURN_URL": "turn:t.example.com:3478",
                                       "VOXTRAL_TURN_USERNAME": "u", "VOXTRAL_TURN_CREDENTIAL": "c"})
    assert args.rtc_configuration == {"iceServers": [{"urls": ["turn:t.example.com:3478"], "username": "u",
                                                      "credential": "c"}]}
    assert callable(app.parse_args([], environ={"SPACE_ID": "someone/voxtral"}).rtc_configuration)


def test_smart_turn_is_on_by_default_unless_the_model_shares_this_machines_cpu():


    default = app.parse_args([], environ={}).end_of_turn
    assert default is None
    assert app.smart_turn_on(default, "cuda") and app.smart_turn_on(default, "remote")
    assert not app.smart_turn_on(default, "cpu")
    assert app.smart_turn_on(app.parse_args(["--end-of-turn"], environ={}).end_of_turn, "cpu")
    off = app.parse_args([], environ={"ENABLE_END_OF_TURN": "0"}).end_of_turn
    assert not app.smart_turn_on(off, "cuda")


@pytest.mark.parametrize("name, value, says", [
    ("PORT", "abc", "PORT='abc': expected a port number"),
    ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE='0': expected a number of sessions from 1 to 1024"),
    ("VOXTRAL_REPLY_TOKENS", "0", "VOXTRAL_REPLY_TOKENS='0': expected a number of tokens from 1 to 4096"),
    ("ENABLE_TORCH_COMPILE", "maybe", "ENABLE_TORCH_COMPILE='maybe': expected true, false or auto"),
    ("TEMPERATURE", "hot", "TEMPERATURE='hot'"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL='loud'"),
    ("VOXTRAL_VOICE", "robot", "VOXTRAL_VOICE='robot': choose from auto, kokoro, espeak"),
    ("VOXTRAL_RTC_CONFIGURATION", "{", "RTC configuration is not JSON"),
])
def test_bad_environment_value_is_a_one_line_error(name, value, says):
    result = run_app("--model", "tiny-random", env={name: value})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and says in lines[0], result.stderr


def test_help_answers_at_once_and_lists_the_flags():
    started = time.perf_counter()
    result = run_app("--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for flag in ("--model", "--max-sessions", "--host", "--port", "--turn-url", "--log-level", "--debug"):
        assert flag in result.stdout
    assert "MAX_BATCH_SIZE" in result.stdout and "GRADIO_SERVER_NAME" in result.stdout
    # ~0.1 s on a 2-core VM shared with other agents; loading torch alone takes seconds there
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"


def test_parsing_imports_nothing_heavy():
    code = "import sys, app; app.parse_args([]); print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port`, read from the kernel's table."""
    addresses = set()
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_listening_addresses_sees_loopback_only_binds():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert listening_addresses(listener.getsockname()[1]) == {"127.0.0.1"}


@pytest.mark.slow  # app.py in a process of its own, served until /health answers, then stopped with SIGTERM
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_as_a_space_runs_it_without_espeak_and_sigterm_with_open_streams_exits_within_10_s(tmp_path, speech):
    """What a Space does: GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT, then `python app.py`, here on a
    machine without espeak-ng (text replies, one warning); and what it does to stop it: SIGTERM while
    clients stream."""
    bin_dir = tmp_path / "bin"  # a PATH with no programs at all, espeak-ng included
    bin_dir.mkdir()
    assert shutil.which("espeak-ng", path=str(bin_dir)) is None
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "PATH": str(bin_dir)}
    log = open(tmp_path / "app.log", "w+")
    process = subprocess.Popen([sys.executable, "app.py", "--model", "tiny-random", "--max-sessions", "2"], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "app.log").read_text()
        assert listening_addresses(port) == {"0.0.0.0"}
        # the loop that serves WebRTC: on asyncio's own, connections drop under load (bench/soak.py)
        assert httpx.get(f"{url}/health", timeout=5).json()["event_loop"] == "uvloop"
        # the model runs in a child process of its own (--model-process, on by default)
        children = [line for line in subprocess.run(["ps", "-o", "args=", "--ppid", str(process.pid)],
                                                    capture_output=True, text=True).stdout.splitlines()]
        assert any("-m voxtral_app.model.model_process" in line for line in children), children

        async def spoken_turn():
            client = await Client.connect(url, spoken=True)  # asks for speech; gets text
            try:
                client.say(np.concatenate([speech[: 2 * SAMPLE_RATE], np.zeros(SAMPLE_RATE, np.float32)]))
                return await client.reply(60)
            finally:
                await client.close()

        history = asyncio.run(spoken_turn())
        assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]
        assert (tmp_path / "app.log").read_text().count("spoken replies are off") == 1  # one warning, at start

        async def run():
            clients = [await Client.connect(url) for _ in range(2)]  # each with its /outputs stream open
            await asyncio.sleep(1)  # a second of streaming: the shutdown meets streams in use, not just opened
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            while process.poll() is None and time.monotonic() - sent < 15:
                await asyncio.sleep(0.1)
            took = time.monotonic() - sent
            for client in clients:
                await client.close()
            return took

        took = asyncio.run(run())
    finally:
        process.kill()
        process.wait(30)
        log.close()
    assert took <= 10, (tmp_path / "app.log").read_text()[-2000:]
    assert process.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def test_temperature_is_where_conversations_start(app_engine):
    """--temperature / TEMPERATURE: a new connection's settings and the page's slider start there."""
    import gradio as gr

    from voxtral_app.serving.app import create_app

    served = create_app(app_engine, app.conversation_options(app.parse_args(["--temperature", "0.7"], environ={}),
                                                             app_engine))
    assert served.state.stream.event_handler.copy().settings.temperature == 0.7
    sliders = [block for block in served.state.ui.blocks.values() if isinstance(block, gr.Slider)]
    assert [slider.value for slider in sliders if slider.label == "Temperature"] == [0.7]


def test_a_busy_port_is_a_one_line_error_before_the_model_loads(tmp_path):
    """Another process listens on the port: app.py says so at once, naming the port and how to change it,
    instead of loading the model first (minutes for the real one) and failing in uvicorn."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = run_app("--model", "tiny-random", "--port", str(busy), env={"VOXTRAL_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{busy}"), result.stderr
    assert "--port" in lines[0] and "PORT" in lines[0]
    assert not os.listdir(tmp_path)  # the tiny model was never built
    assert app.port_taken("127.0.0.1", free_port()) is None
