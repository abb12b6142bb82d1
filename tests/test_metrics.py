"""Monitoring: GET /metrics parsed with prometheus-client's own parser and scraped by a real
Prometheus server (Debian's `prometheus`), /health's fields and its 503, and the deploy/ kit
(compose file, Prometheus config, Grafana provisioning, and every PromQL name in the dashboard)."""

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time

import httpx
import numpy as np
import psutil
import pytest
import websockets
import yaml
from conftest import app_options
from prometheus_client.parser import text_string_to_metric_families
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine
from voxtral_app.serving.app import create_app
from voxtral_app.serving.metrics import TRANSPORTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
PROMETHEUS = shutil.which("prometheus")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan", "le"}


def scrape(server) -> dict:
    """/metrics -> {sample name: [(labels, value)]}, through prometheus-client's parser."""
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def families(server) -> dict:
    return {family.name: family.type for family in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics").text)}


def value(samples, name, **labels) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def dashboard_expressions() -> list[str]:
    with open(os.path.join(DEPLOY, "grafana", "voxtral.json")) as file:
        board = json.load(file)
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (labels, durations, functions and keywords left out)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        followed = expr[match.end():].lstrip()
        if not followed.startswith("(") and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def session_turns(server, texts: list[str], speech=None) -> list[dict]:
    """A session-API conversation: an optional spoken turn, then typed ones; -> the text_responses."""
    async def run():
        session = httpx.post(f"{server.url}/session/create", json={"temperature": 0.0}).json()
        responses = []
        async with websockets.connect(server.url.replace("http", "ws", 1) + session["websocket_url"]) as ws:
            if speech is not None:
                audio = np.concatenate([speech, np.zeros(SAMPLE_RATE, np.float32)])
                pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
                for at in range(0, len(pcm), 640):  # 20 ms, in real time
                    await ws.send(pcm[at:at + 640])
                    await asyncio.sleep(0.02)
                responses.append(await response(ws))
            for text in texts:
                await ws.send(json.dumps({"type": "text_input", "text": text}))
                responses.append(await response(ws))
        return responses

    async def response(ws):
        while True:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, str) and json.loads(message)["type"] == "text_response":
                return json.loads(message)

    return asyncio.run(run())


def wait_for_free_slots(engine, timeout_s=10):
    deadline = time.time() + timeout_s
    while time.time() < deadline and engine.active_chats:
        time.sleep(0.05)
    assert engine.active_chats == 0


def test_metrics_are_prometheus_text_with_the_promised_names(live_server, app_engine):
    kinds = families(live_server)
    for name, kind in {"websocket_connections_active": "gauge", "audio_processing_duration_seconds": "histogram",
                       "model_inference_duration_seconds": "histogram", "gpu_memory_allocated_bytes": "gauge",
                       "turn_latency_seconds": "histogram", "time_to_first_token_seconds": "histogram",
                       "generated_tokens": "counter", "turns": "counter", "turn_retractions": "counter",
                       "sessions_rejected": "counter", "errors": "counter", "engine_slots_in_use": "gauge",
                       "engine_ready": "gauge"}.items():
        assert kinds.get(name) == kind, name
    before = scrape(live_server)
    buckets = sorted(float(labels["le"]) for labels, _ in before["turn_latency_seconds_bucket"])
    assert buckets[0] == 0.01 and buckets[-2] == 10.0 and math.isinf(buckets[-1])  # 10 ms .. 10 s, +Inf
    assert {labels["transport"] for labels, _ in before["websocket_connections_active"]} >= set(TRANSPORTS)
    assert {labels["phase"] for labels, _ in before["model_inference_duration_seconds_count"]} == {"prefill",
                                                                                                  "decode"}
    assert value(before, "engine_ready") == 1 and value(before, "gpu_memory_allocated_bytes") == 0  # CPU

    async def while_connected():
        session = httpx.post(f"{live_server.url}/session/create").json()
        async with websockets.connect(live_server.url.replace("http", "ws", 1) + session["websocket_url"]) as ws:
            await ws.send(np.zeros(1600, "<i2").tobytes())  # 100 ms of silence through the VAD
            await ws.send(json.dumps({"type": "text_input", "text": "Hello there."}))
            while json.loads(await ws.recv())["type"] != "text_response":
                pass
            return await asyncio.to_thread(scrape, live_server)

    during = asyncio.run(while_connected())
    assert value(during, "websocket_connections_active", transport="session_ws") == 1
    assert value(during, "engine_slots_in_use") == 1
    assert value(during, "turns_total", mode="chat", transport="session_ws") == \
        value(before, "turns_total", mode="chat", transport="session_ws") + 1
    assert value(during, "generated_tokens_total") > value(before, "generated_tokens_total")
    assert value(during, "audio_processing_duration_seconds_count") > value(before,
                                                                            "audio_processing_duration_seconds_count")
    for phase in ("prefill", "decode"):
        assert value(during, "model_inference_duration_seconds_count", phase=phase) > \
            value(before, "model_inference_duration_seconds_count", phase=phase)
    wait_for_free_slots(app_engine)
    after = scrape(live_server)
    assert value(after, "websocket_connections_active", transport="session_ws") == 0
    assert value(after, "engine_slots_in_use") == 0


def test_every_dashboard_query_names_an_exported_metric(live_server):
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{kind="b"}[1m]))) / on() c') == {
        "a_bucket", "c"}  # the name extraction itself
    exported = set(scrape(live_server))
    expressions = dashboard_expressions()
    named = set().union(*map(metric_names, expressions))
    assert len(expressions) >= 10 and len(named) >= 10
    assert named <= exported, f"the dashboard queries metrics /metrics does not export: {named - exported}"
    wanted = {"websocket_connections_active", "turn_latency_seconds_bucket", "time_to_first_token_seconds_bucket",
              "generated_tokens_total", "engine_slots_in_use", "gpu_memory_allocated_bytes", "errors_total"}
    assert wanted <= named  # connections, latency, TTFT, tokens/s, slots, GPU memory, error rate
    assert any("histogram_quantile(0.99, " in e and "turn_latency_seconds" in e for e in expressions)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def prometheus(live_server, tmp_path):
    """A real Prometheus scraping the live server every second; yields a query function."""
    if PROMETHEUS is None:
        pytest.skip("Debian's `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)")
    port, target = free_port(), live_server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                      "scrape_configs": [{"job_name": "voxtral", "static_configs": [
                                          {"targets": [target]}]}]}))
    process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def query(expr: str) -> dict:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]

    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read().decode()
            assert time.time() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.2)
        yield query
    finally:
        process.terminate()
        process.wait(10)


def scalar(data: dict) -> float | None:
    return float(data["result"][0]["value"][1]) if data["result"] else None


def until(query, expr: str, ok, timeout_s: float = 30):
    deadline = time.time() + timeout_s
    while True:
        found = scalar(query(expr))
        if found is not None and ok(found):
            return found
        assert time.time() < deadline, f"{expr} = {found}"
        time.sleep(0.5)


@pytest.mark.slow  # a Prometheus server, scraping every second
def test_a_real_prometheus_scrapes_turns_and_latency(prometheus, live_server, app_engine, speech):
    until(prometheus, 'up{job="voxtral"}', lambda up: up == 1)  # scraping works before the turns
    turns_before = value(scrape(live_server), "turns_total")
    responses = session_turns(live_server, ["And now, in French?"], speech=speech[: 2 * SAMPLE_RATE])
    assert len(responses) == 2 and responses[0]["latency_ms"] is not None
    turns = until(prometheus, "sum(turns_total)", lambda total: total >= turns_before + 2)
    p90 = until(prometheus, "histogram_quantile(0.9, sum by (le) (turn_latency_seconds_bucket))",
                lambda seconds: seconds > 0)
    assert turns >= 2 and 0 < p90 <= 10.0
    assert scalar(prometheus('sum(websocket_connections_active{transport="session_ws"})')) is not None
    for expr in dashboard_expressions():  # every panel's query runs and finds series
        assert prometheus(expr)["result"], expr
    wait_for_free_slots(app_engine)


def test_health_reports_gpu_system_and_sessions(live_server, app_engine):
    body = httpx.get(f"{live_server.url}/health").json()
    assert body["status"] == "healthy"
    assert body["gpu_available"] is False and body["gpu_count"] == 0  # this CPU machine
    assert body["active_sessions"] == app_engine.active_chats and body["max_sessions"] == app_engine.options.slots
    system = body["system"]
    assert 0 <= system["cpu_percent"] <= 100
    assert abs(system["memory_percent"] - psutil.virtual_memory().percent) < 10  # this machine's, give or take
    assert system["gpu_memory_allocated"] == 0


def test_health_is_503_and_sessions_refused_when_the_decode_thread_is_stopped(tiny_checkpoint):
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=1, max_tokens=512, warmup=False))
    server = BackgroundServer(create_app(engine, app_options(engine), speaker=None))
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert value(scrape(server), "engine_ready") == 1
        engine.fail(RuntimeError("injected: the GPU fell off the bus"))  # the decode thread stops
        engine.thread.join(10)
        assert not engine.thread.is_alive()
        response = httpx.get(f"{server.url}/health")
        body = response.json()
        assert response.status_code == 503 and body["status"] == "degraded" and "GPU fell off" in body["error"]
        assert "system" in body and "gpu_available" in body
        samples = scrape(server)
        assert value(samples, "engine_ready") == 0 and value(samples, "engine_healthy") == 0
        refused = httpx.post(f"{server.url}/session/create")
        assert refused.status_code == 503 and refused.json()["meta"]["error"] == "engine_failed"
    finally:
        server.stop()
        engine.close()


def test_the_compose_kit_wires_the_app_prometheus_and_grafana():
    with open(os.path.join(DEPLOY, "docker-compose.yml")) as file:
        compose = yaml.safe_load(file)
    app, prom, grafana = (compose["services"][name] for name in ("voxtral", "prometheus", "grafana"))
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]  # = --gpus all
    assert os.path.exists(os.path.join(DEPLOY, app["build"], "Dockerfile"))

    def mounted(service, inside):  # the host file mounted at `inside`, which must exist
        for volume in service["volumes"]:
            host, target = volume.split(":")[:2]
            if target == inside:
                assert os.path.exists(os.path.join(DEPLOY, host)), host
                return os.path.join(DEPLOY, host)
        raise AssertionError(f"nothing mounted at {inside}")

    config_path = mounted(prom, "/etc/prometheus/prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    with open(config_path) as file:
        config = yaml.safe_load(file)
    job = config["scrape_configs"][0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"localhost:{app['environment']['PORT']}"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    board = mounted(grafana, "/var/lib/grafana/dashboards/voxtral.json")
    with open(os.path.join(provisioning, "datasources", "prometheus.yml")) as file:
        source = yaml.safe_load(file)["datasources"][0]
    with open(os.path.join(provisioning, "dashboards", "voxtral.yml")) as file:
        assert yaml.safe_load(file)["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert source["url"] == "http://localhost:9090" and "--web.listen-address=:9090" in prom["command"]
    with open(board) as file:
        panels = json.load(file)["panels"]
    assert {panel["datasource"]["uid"] for panel in panels} == {source["uid"]}
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package ships it
        checked = subprocess.run([promtool, "check", "config", config_path], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
