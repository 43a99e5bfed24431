from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from flowscope.collector.schema import SchemaOptions
from flowscope.collector.service import Collector, CollectorConfig
from flowscope.config import Settings
from flowscope.stack import Stack


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


StackFactory = Callable[..., AbstractAsyncContextManager[Stack]]


@pytest.fixture
def stack_factory(chdb_dsn: str, database: str) -> StackFactory:
    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Stack]:
        writer_factory = overrides.pop("writer_factory", None)
        settings = Settings(
            clickhouse_dsn=chdb_dsn,
            database=database,
            otlp_grpc_port=0,
            otlp_http_port=0,
            http_port=0,
            flush_interval_s=0.05,
        ).with_overrides(**overrides)
        async with Stack(settings, writer_factory).running() as stack:
            yield stack

    return make


@pytest.fixture
async def stack(stack_factory: StackFactory) -> AsyncIterator[Stack]:
    async with stack_factory() as running:
        yield running
