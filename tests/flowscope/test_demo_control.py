"""`flowscope demo` runs its samples through the control plane: its engine dials the stack,
each run is started by REST and the failed billing run retried from its failed node."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.flowscope.test_cli import ROOT, cli_env

pytestmark = pytest.mark.slow

VIEWER = "viewer-token"
_DEADLINE_S = 60.0


async def _lines_until(stream: asyncio.StreamReader, marker: str) -> list[str]:
    lines: list[str] = []
    while not any(marker in line for line in lines):
        raw = await asyncio.wait_for(stream.readline(), _DEADLINE_S)
        if not raw:
            raise AssertionError("the demo exited early:\n" + "".join(lines))
        lines.append(raw.decode())
    return lines


async def _eventually(http: httpx.AsyncClient, path: str, wanted: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + _DEADLINE_S
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = await http.get(path)
        body = answer.json() if answer.status_code == 200 else {}
        if all(body.get(k) == v for k, v in wanted.items()):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path}: wanted {wanted}, last {body}")


async def test_the_demo_starts_and_retries_its_samples_through_the_stack(tmp_path: Path) -> None:
    env = cli_env(FLOWSCOPE_AUTH_TOKENS=f"{VIEWER}=viewer:*")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowscope", "demo", "--runs", "1", "--http-port", "0", "--otlp-grpc-port", "0",
        "--otlp-http-port", "0", "--data-dir", str(tmp_path / "data"), "--no-spool",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = await _lines_until(process.stdout, "round(s) done")
        text = "".join(lines)
        web = re.search(r"live view\s+(http://\S+)/", text)
        assert web is not None, text
        billing = re.findall(r"([✓✗]) Billing sync\s+(\w+).*/executions/([0-9a-f]{32})", text)
        assert [(mark, result) for mark, result, _ in billing] == [("✗", "failure"), ("✓", "success")], text
        failed_id, retry_id = billing[0][2], billing[1][2]
        async with httpx.AsyncClient(base_url=web.group(1), headers={"authorization": f"Bearer {VIEWER}"}) as http:
            engines = (await http.get("/api/v1/engines")).json()["items"]
            assert len(engines) == 1
            served = {w["workflowId"] for w in engines[0]["workflows"]}
            assert served == {"research-agent", "etl-orders", "billing-sync", "weekly-report"}
            retried = await _eventually(
                http, f"/api/v1/executions/{retry_id}", {"status": "success", "resumedFrom": failed_id}
            )
            assert retried["trigger"] == "retry"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), _DEADLINE_S)
    assert process.returncode == 0, rest.decode()
