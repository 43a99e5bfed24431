from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from collector.schema import SchemaOptions
from collector.service import Collector, CollectorConfig


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """chdb allows one data directory per process: every test shares it, isolated by database."""
    path: Path = tmp_path_factory.mktemp("chdb")
    return f"chdb://{path}"


@pytest.fixture
def database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


CollectorFactory = Callable[..., AbstractAsyncContextManager[Collector]]


@pytest.fixture
def collector_factory(chdb_dsn: str, database: str) -> CollectorFactory:
    def make(**overrides: Any) -> AbstractAsyncContextManager[Collector]:
        config = CollectorConfig(
            dsn=overrides.pop("dsn", chdb_dsn),
            schema=SchemaOptions(database=overrides.pop("database", database)),
            grpc_port=0,
            http_port=0,
            flush_interval_s=overrides.pop("flush_interval_s", 0.05),
            **overrides,
        )
        return Collector(config).running()

    return make


@pytest.fixture
async def collector(collector_factory: CollectorFactory) -> AsyncIterator[Collector]:
    async with collector_factory() as running:
        yield running
