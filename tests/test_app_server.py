"""The App server on loopback with the plugin dir: /plugins lists it, /operators/execute runs one."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from fairbalance.find import balance

PLUGIN = "@fairbalance/fairbalance"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, payload=None, timeout=30):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve_app(tmp_path_factory, **extra_env):
    """Run ``fiftyone.server.main`` on a free loopback port (``extra_env`` added to its environment); yield its URL."""
    import fiftyone.core.odm.database as fodb

    fodb.get_db_client()  # the tests' mongod; the server process shares it
    env = {**os.environ, **extra_env}
    if fodb._connection_kwargs.get("port"):
        env["FIFTYONE_PRIVATE_DATABASE_PORT"] = str(fodb._connection_kwargs["port"])
    port = _free_port()
    log = open(tmp_path_factory.mktemp("app") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "fiftyone.server.main", "--port", str(port),
                             "--address", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            _request(f"{base}/plugins", timeout=5)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"App server did not start:\n{log.read()[-3000:]}")
            time.sleep(1)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: stop it the hard way rather than fail the tests
        proc.kill()
        proc.wait()
    log.close()


def test_plugins_endpoint_lists_plugin(app_server):
    plugins = _request(f"{app_server}/plugins")["plugins"]
    ours = [p for p in plugins if p["name"] == PLUGIN]
    assert ours and "balance_report" in ours[0]["operators"] and "balance_panel" in ours[0]["panels"]


def test_execute_operator_over_http(app_server, digits_dataset):
    payload = {"operator_uri": f"{PLUGIN}/balance_report", "dataset_name": digits_dataset.name, "view": [],
               "params": {"label_field": "color", "attribute_field": "ground_truth"}}
    out = _request(f"{app_server}/operators/execute", payload)
    assert out.get("error") is None, out
    sdk = balance.balance_report(digits_dataset, "color", attribute_field="ground_truth")
    assert out["result"]["counts"] == sdk.counts
    assert out["result"]["entropy"] == round(sdk.entropy, 3)  # rounded for people; the computation is the SDK's
