"""The bridge is assembled once: the embedded stack and `flowscope bridge` take the same settings
(heartbeat interval, queue size, the server's WebSocket message bound, …) the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flowscope.stack import bridge_config
from tests.conftest import StackFactory

ROOT = Path(__file__).parents[2]
_TIMEOUT_S = 60.0


async def test_the_stack_builds_its_bridge_from_the_shared_assembly(stack_factory: StackFactory) -> None:
    async with stack_factory(heartbeat_interval_s=0.25, ws_queue_size=77, allowed_hosts=("ops.example",)) as stack:
        assert stack.bridge is not None
        assert stack.bridge.config == bridge_config(stack.settings, otlp_port=stack.settings.bridge_otlp_port)
        assert stack.bridge.config.limits.heartbeat_interval_s == 0.25
        assert stack.bridge.config.limits.queue_size == 77


async def _bridge_port(process: asyncio.subprocess.Process) -> int:
    assert process.stdout is not None
    async with asyncio.timeout(_TIMEOUT_S):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "flowscope bridge exited before serving"
            found = re.search(r"bridge up: http://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))


async def test_the_bridge_command_honours_the_heartbeat_interval_and_the_message_bound(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWSCOPE_", "OTEL_"))}
    env.update({"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200", "FLOWSCOPE_HEARTBEAT_INTERVAL_S": "0.05"})
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "flowscope.cli", "bridge", "--dsn", f"chdb://{tmp_path}/chdb"),
        *("--http-port", "0", "--otlp-port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        port = await _bridge_port(process)
        async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            # Two heartbeats within the wait: at the default 15 s interval the second would not come.
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
            assert [f["type"] for f in frames] == ["heartbeat", "heartbeat"]
            # Past the message bound the server closes the connection (1009) instead of reading it.
            await ws.send("x" * ((1 << 20) + 1))
            async with asyncio.timeout(10):
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1009
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    assert process.returncode == 0
