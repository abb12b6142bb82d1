"""What the server measures, for Prometheus (`GET /metrics`) and `/health`.

The turn, token and timing metrics are process-wide prometheus-client objects that the code
observes where things happen (handler.py, session_api.py; a conversation's events through
`conversation_event`, the engine's steps through `inference_timed`); each app's
registry (`registry(engine)`) serves them together with gauges read from its engine at scrape
time (slots in use, readiness, GPU memory, open conversations by transport). Nothing is
registered in prometheus-client's global registry, so several apps in one process (tests) never
clash. Thread-safe: prometheus-client's metrics lock themselves; `OPEN` is guarded by `open_lock`.
"""

import threading

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..conversation.events import (
    Closed,
    Event,
    Opened,
    ReplyFinished,
    ReplyRetracted,
    ReplyStarted,
    ReplyStats,
    TurnFailed,
)

# 10 ms .. 10 s: a real-time turn should land in the first few buckets; a stuck one in the last
SECONDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
# a 20 ms audio chunk or one decode step: 0.5 ms .. 1 s
FAST_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
TRANSPORTS = ("webrtc", "websocket", "phone", "session_ws", "ui_upload")  # always exported, 0 when none

TURN_LATENCY = Histogram("turn_latency_seconds", "End of the person's turn (last speech, or the typed message) "
                         "to the first token of the reply", buckets=SECONDS, registry=None)
FIRST_TOKEN = Histogram("time_to_first_token_seconds", "Turn began (prompt building included) to first token, "
                        "in the engine", buckets=SECONDS, registry=None)
INFERENCE = Histogram("model_inference_duration_seconds", "Time the decode thread spends in one prefill or "
                      "one batched decode step", ["phase"], buckets=FAST_SECONDS + (2.5, 5.0, 10.0), registry=None)
AUDIO = Histogram("audio_processing_duration_seconds", "Decode, resample and VAD time per incoming audio chunk",
                  buckets=FAST_SECONDS, registry=None)
TOKENS = Counter("generated_tokens", "Tokens generated for shown replies", registry=None)
TURNS = Counter("turns", "Turns shown, by mode and transport", ["mode", "transport"], registry=None)
RETRACTIONS = Counter("turn_retractions", "Shown replies taken back because the person went on speaking",
                      registry=None)
REJECTED = Counter("sessions_rejected", "Connections and sessions refused: every slot taken (or the engine failed)",
                   registry=None)
ERRORS = Counter("errors", "Errors told to a client, by kind (audio, turn, client)", ["kind"], registry=None)
OFFLOADS = Counter("kv_offloads", "Idle conversations whose KV cache moved to host memory to free a slot",
                   registry=None)
RESTORES = Counter("kv_restores", "Conversations whose KV cache came back from host memory for a turn", registry=None)
REPREFILLS = Counter("kv_reprefills", "Conversations prefilled again from their history (their cache was dropped "
                     "past --kv-host-gb)", registry=None)
RESTORE_TIME = Histogram("kv_restore_duration_seconds", "Copying one conversation's KV cache back to the device",
                         buckets=FAST_SECONDS, registry=None)
PROCESS_WIDE = (TURN_LATENCY, FIRST_TOKEN, INFERENCE, AUDIO, TOKENS, TURNS, RETRACTIONS, REJECTED, ERRORS,
                OFFLOADS, RESTORES, REPREFILLS, RESTORE_TIME)

for phase in ("prefill", "decode"):  # export both series from the start (dashboards need no gaps)
    INFERENCE.labels(phase)
for kind in ("audio", "turn", "client"):
    ERRORS.labels(kind)
for mode in ("chat", "transcribe"):  # conversation.MODES
    for transport in TRANSPORTS:
        TURNS.labels(mode, transport)

OPEN: set = set()  # conversations holding a slot (conversation_event adds and removes them)
open_lock = threading.Lock()


def open_conversations(backend) -> list:
    with open_lock:
        return [c for c in OPEN if c.backend is backend]


def conversation_event(conversation, event: Event) -> None:
    """A conversation's listener (Conversation(listener=...)): count what its events say. On its worker thread."""
    if isinstance(event, Opened):
        with open_lock:
            OPEN.add(conversation)
    elif isinstance(event, Closed):
        with open_lock:
            OPEN.discard(conversation)
    elif isinstance(event, ReplyStarted):
        TURN_LATENCY.observe(event.latency_s)
    elif isinstance(event, ReplyFinished):
        turn_shown(conversation.name, event.stats)
        if event.error is not None:
            ERRORS.labels("turn").inc()
    elif isinstance(event, ReplyRetracted):
        RETRACTIONS.inc()
        if event.stats is not None:  # it was still streaming: it never finished, so count it here
            turn_shown(conversation.name, event.stats)
    elif isinstance(event, TurnFailed) and event.kind in ("audio", "turn"):
        ERRORS.labels(event.kind).inc()


def turn_shown(transport: str, stats: ReplyStats) -> None:
    """A shown turn is over (finished, cancelled or retracted): count it and its tokens."""
    TURNS.labels(stats.mode, transport).inc()
    TOKENS.inc(stats.tokens)
    if stats.backend_first_token_s is not None:
        FIRST_TOKEN.observe(stats.backend_first_token_s)


def gpu_memory_bytes(backend) -> int:
    return backend.memory_bytes()


class EngineCollector:
    """Gauges read from one engine when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        connections = GaugeMetricFamily("websocket_connections_active", "Connected conversations (each holds a "
                                        "slot), by transport", labels=["transport"])
        counts = dict.fromkeys(TRANSPORTS, 0)
        for conversation in open_conversations(engine):
            if getattr(conversation.chat, "away", False):  # kept for a resume: no connection (conversations_kept)
                continue
            counts[conversation.name] = counts.get(conversation.name, 0) + 1
        for transport, count in sorted(counts.items()):
            connections.add_metric([transport], count)
        yield connections
        yield GaugeMetricFamily("engine_slots_in_use", "Connected conversations (each one of --max-sessions)",
                                value=engine.active_chats)
        yield GaugeMetricFamily("engine_slots_total", "Connected conversations at most (--max-sessions)",
                                value=engine.options.slots)
        yield GaugeMetricFamily("kv_slots_in_use", "KV-cache rows on the device holding a conversation (--kv-slots)",
                                value=getattr(engine, "kv_rows_in_use", 0))
        yield GaugeMetricFamily("kv_conversations_on_host", "Conversations whose KV cache waits in host memory",
                                value=getattr(engine, "kept_on_host", 0))
        yield GaugeMetricFamily("conversations_kept", "Conversations kept without a connection for a resume",
                                value=engine.kept_conversations)
        yield GaugeMetricFamily("engine_generations_in_flight", "Replies handed to the decode thread and not yet "
                                "finished (queued prefills included): a growing number means it cannot keep up",
                                value=engine.in_flight)
        yield GaugeMetricFamily("engine_ready", "1 once warm-up succeeded and the decode thread is healthy",
                                value=int(engine.ready.is_set() and engine.healthy))
        yield GaugeMetricFamily("engine_healthy", "0 when the decode thread died or is stuck",
                                value=int(engine.healthy))
        yield GaugeMetricFamily("gpu_memory_allocated_bytes", "torch.cuda.memory_allocated on the model's GPU "
                                "(0 on CPU)", value=gpu_memory_bytes(engine))


def registry(engine) -> CollectorRegistry:
    """One app's registry: the process-wide metrics, its engine's gauges, process CPU and memory."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in PROCESS_WIDE:
        registry.register(metric)
    registry.register(EngineCollector(engine))
    ProcessCollector(registry=registry)
    return registry


def inference_timed(phase: str, seconds: float) -> None:
    """An engine listener (Engine.listen): one prefill piece or decode step took `seconds`; or a conversation's
    KV cache moved (model/rows.py: offload, restore, reprefill)."""
    if phase == "offload":
        OFFLOADS.inc()
    elif phase == "restore":
        RESTORES.inc()
        RESTORE_TIME.observe(seconds)
    elif phase == "reprefill":
        REPREFILLS.inc()
    else:
        INFERENCE.labels(phase).observe(seconds)


def add_metrics_route(app, engine) -> None:
    """`GET /metrics`: Prometheus text format (a sync route: FastAPI runs it off the event loop)."""
    from fastapi.responses import Response

    engine.listen(inference_timed)
    served = registry(engine)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(served), media_type=CONTENT_TYPE_LATEST)


def system_health(engine) -> dict:
    """/health's GPU and system fields; every call here returns at once (no sampling interval)."""
    import torch

    available = torch.cuda.is_available()
    return {"gpu_available": available, "gpu_count": torch.cuda.device_count() if available else 0,
            "system": {"cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call
                       "memory_percent": psutil.virtual_memory().percent,
                       "gpu_memory_allocated": round(gpu_memory_bytes(engine) / 1e9, 3)}}  # GB
