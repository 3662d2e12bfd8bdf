"""The server's published OpenAPI schema, fuzzed by Schemathesis with every check on.

The real command serves a tiny random model; Schemathesis reads /openapi.json and sends what it
generates from it, valid and invalid, with a bounded number of examples per operation. Every answer
must be a documented status with a body of the documented shape, no 5xx, valid data accepted and
invalid data refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from examplegpt.weights import save_model_file

from .conftest import REPO, peaked_model
from .test_serve import ServerProcess

CAPACITY = (2, 2)  # max_batch, max_queue: small, so the schema's limits are met often


@pytest.mark.slow
def test_every_answer_conforms_to_the_published_schema(tmp_path):
    if shutil.which("schemathesis") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    model_file = tmp_path / "tiny.pt"
    save_model_file(peaked_model(64), model_file)
    flags = ["--max-batch", str(CAPACITY[0]), "--max-queue", str(CAPACITY[1]), "--max-tokens-limit", "8"]
    server = ServerProcess(model_file, *flags, "--api-key", "sesame")
    try:
        schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
        assert "422" not in str(schema["paths"]) and "ErrorResponse" in schema["components"]["schemas"]
        env = dict(os.environ, PYTHONPATH=str(REPO), SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
                   EXAMPLEGPT_CAPACITY=str(sum(CAPACITY)))  # fmt: skip
        command = ["schemathesis", "run", server.url + "/openapi.json", "--checks", "all", "--mode", "all",
                   "--max-examples", "10", "--seed", "0", "--workers", "1", "--request-timeout", "30",
                   "--header", "Authorization: Bearer sesame", "--no-color"]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    finally:
        server.stop()
    assert "Traceback" not in server.proc.stderr.read()
