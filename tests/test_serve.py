"""`mlflow models serve` answers a request for a trained model, on a free 127.0.0.1 port and nowhere else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest
import torch
from conftest import LOOPBACK, command_env, free_port

import digitgen
from digitgen.serving import request_frame

pytestmark = pytest.mark.slow  # every test here starts `mlflow models serve`

START_SECONDS = 180  # a fresh process imports MLflow and torch and loads the model: slow on a busy CPU
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback even where a proxy is set


def _answers_ping(port: int) -> bool:
    try:
        with _no_proxy.open(f"http://{LOOPBACK}:{port}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_mlflow_models_serve_answers_every_mode_like_the_api(trained_models, mnist_subset, tmp_path):
    trained = trained_models["cvae"]
    port = free_port()
    env = command_env(MLFLOW_TRACKING_URI=trained.tracking_uri, MLFLOW_DISABLE_TELEMETRY="true")  # the env's uvicorn
    log = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"runs:/{trained.run_id}/cvae-4-seed0",
        "--env-manager",
        "local",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not _answers_ping(port):
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() - started > START_SECONDS:
                pytest.skip(f"mlflow models serve did not answer /ping on {LOOPBACK}:{port} within {START_SECONDS} s")
            time.sleep(0.5)
        print(f"server answered /ping after {time.monotonic() - started:.1f} s")

        test = mnist_subset["test"]
        images, labels = test.float_images()[:3].reshape(-1, 28, 28), test.labels[:3]
        request = pd.concat(
            [
                request_frame("generate", digits=[2, 0, 2, 6]),
                request_frame("classify", images=images),
                request_frame("validate", images=images, digits=labels),
            ],
            ignore_index=True,
        )
        body = {
            "dataframe_split": json.loads(request.to_json(orient="split", index=False)),
            "params": {"seed": 7, "same_style": True},
        }
        call = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        asked = time.monotonic()
        with _no_proxy.open(call, timeout=60) as response:
            text = response.read().decode()
        print(f"server answered {len(request)} rows in {time.monotonic() - asked:.2f} s")
        answer = pd.DataFrame(json.loads(text, parse_constant=pytest.fail)["predictions"])  # strict JSON: no NaN

        bad = {"dataframe_records": [{"mode": "classify", "pixels": [2.0] * 784}]}
        call = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/invocations",
            data=json.dumps(bad).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            _no_proxy.open(call, timeout=60)
        assert refused.value.code == 400
        error = json.loads(refused.value.read().decode())
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert error["message"].endswith("Error: expected pixel values in [0, 1], got values from 2 to 2")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, started in their own session
        server.wait(timeout=30)

    api = digitgen.load(trained.path)
    assert answer.probability[:4].isna().all()  # generate rows have no probability: JSON null
    generated = torch.tensor(answer.pixels[:4].tolist()).reshape(-1, 28, 28)
    assert torch.allclose(generated, api.generate([2, 0, 2, 6], seed=7, same_style=True), atol=1e-6)
    assert answer.digit[4:7].tolist() == api.classify(images).digits.tolist()
    validated = torch.tensor(answer.probability[7:10].tolist()).float()
    assert torch.allclose(validated, api.validate(images, labels), atol=1e-6)
