"""Background ClickHouse work (inserts, ETA lookups) runs below the live path's priority, embedded only."""

from __future__ import annotations

import os
import threading
import time

from flowscope.collector.service import Collector
from flowscope.collector.store import Dsn, background_settings

_CAP_SYS_NICE = 23


def may_renice() -> bool:
    with open("/proc/self/status") as status:
        caps = next(line for line in status if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> _CAP_SYS_NICE & 1)


def thread_nices() -> set[int]:
    nices = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                nices.add(int(stat.read().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return nices


def test_only_the_embedded_engine_is_asked() -> None:
    assert background_settings(Dsn.parse("chdb:///tmp/x")) == {"os_thread_priority": 10}
    # A server's user profile may forbid changing the setting; its priority is the server's business.
    assert background_settings(Dsn.parse("http://u:p@clickhouse:8123/db")) == {}


def test_embedded_query_threads_run_at_the_lower_priority(collector: Collector) -> None:
    client = collector.client()
    settings = {**background_settings(collector.dsn), "max_threads": 2}
    result: list[int] = []
    query = threading.Thread(
        target=lambda: result.append(
            client.query(
                "SELECT count() FROM numbers(800000000) WHERE cityHash64(number) % 7 = 0", settings=settings
            ).result_rows[0][0]
        )
    )
    seen: set[int] = set()
    query.start()
    while query.is_alive():
        seen |= thread_nices()
        time.sleep(0.01)
    query.join()
    assert result and result[0] > 0
    if may_renice():
        assert 10 in seen
    # Afterwards no thread stays lowered: the calling thread and the pool threads are given back.
    assert 10 not in thread_nices()
