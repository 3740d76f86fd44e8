"""`rollout serve` basics: /health, /version, /v1/models, the API key, JSON errors, the CLI's checks, and a
subprocess started like the README says that answers /health and stops cleanly on SIGTERM (a stream in flight
ends with a final "abort" event and [DONE], the exit status is 0)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rollout.cli import main
from rollout.serve import build_app
from serve_helpers import serving, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=16, max_num_batched_tokens=256, seed=3)


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG, model_name="tiny")


def call(app, method, path, **kwargs) -> httpx.Response:
    """One request to the app in this process (no server)."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def test_health_version_models(live):
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.url}/version").json()["version"]
    models = httpx.get(f"{live.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_api_key(live):
    app = build_app(live.server.engine, "tiny", api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = call(app, "GET", "/health", headers=headers)
        assert r.status_code == 401
        assert "API key" in r.json()["error"]["message"]
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_errors_are_json(live):
    app = build_app(live.server.engine, "tiny", max_body_bytes=1000)
    r = call(app, "GET", "/no/such/route")
    assert r.status_code == 404 and "/no/such/route" in r.json()["error"]["message"]
    r = call(app, "POST", "/health")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/models", content=b"x" * 2000)
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]


def test_cli_refuses_public_host_without_key(capsys):
    assert main(["serve", "--model", "/nonexistent", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent"]) == 2
    assert "no config.json" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_subprocess_serves_and_stops_on_sigterm(text_checkpoint):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "rollout.cli", "serve", "--model", str(text_checkpoint), "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(healthy, "rollout serve to answer /health", timeout=120, alive=lambda: proc.poll() is None)
        url = f"http://127.0.0.1:{port}"
        body = {"input_ids": [5, 6, 7], "stream": True, "sampling_params": {"max_tokens": 400, "ignore_eos": True}}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["output_ids"]
            # paused in keep mode, the stream is still running when the signal comes
            assert httpx.post(f"{url}/pause_generation", json={"mode": "keep"}).status_code == 200
            proc.send_signal(signal.SIGTERM)
            rest = [line.removeprefix("data: ") for line in lines if line]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["finish_reason"] == "abort"
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
