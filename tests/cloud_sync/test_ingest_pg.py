"""Ingest on PostgreSQL: a throw-away cluster started by the test itself (initdb + pg_ctl)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.agent import Agent
from cloud_sync.ingest import IngestDB, IngestWorker
from cloud_sync.topics import LogBatch
from tests.cloud_sync.conftest import Broker, wait_until
from tests.cloud_sync.helpers import add_verdicts, fleet_settings, make_store, uplink_config
from tests.conftest import IN_CI, find_tool, free_tcp_port, require_tool


def _pg_tool(name: str) -> str:
    """A PostgreSQL server binary: on PATH, or where Debian puts it (not on PATH)."""
    found = find_tool(name)
    if found is not None:
        return found
    for cand in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        if os.access(cand, os.X_OK):
            return str(cand)
    return require_tool(name)  # fails under CI, skips elsewhere


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if IN_CI:  # the test command installs both: missing means a broken setup, not a skip
        import psycopg  # noqa: F401
    else:
        pytest.importorskip("psycopg", reason="optional 'postgres' extra not installed")
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="lineinspect-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = free_tcp_port()
    data = root / "data"
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "li"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *prefix,
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(root / "pg.log"),
                "-w",
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql://li@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _batch(device: str, first: int, n: int) -> LogBatch:
    return LogBatch.model_validate(
        {
            "device": device,
            "first_seq": first,
            "last_seq": first + n - 1,
            "sent_unix": 0.0,
            "records": [
                {
                    "seq": s,
                    "inspection_id": s,
                    "code": "OK",
                    "score": 0.2,
                    "threshold": 1,
                    "decided_unix": time.time(),
                }
                for s in range(first, first + n)
            ],
        }
    )


@pytest.mark.slow
def test_postgres_ingest_dedups_and_serves_an_agent(
    postgres_url: str, broker: Broker, tmp_path: Path
) -> None:
    db = IngestDB(postgres_url)
    assert db.kind == "postgresql"
    assert db.insert_batch(_batch("dev-x", 1, 10), time.time()) == (10, 0)
    assert db.insert_batch(_batch("dev-x", 6, 10), time.time()) == (5, 5)
    assert db.seqs("dev-x") == list(range(1, 16))
    worker = IngestWorker(fleet_settings(broker, "ingest-pg"), db)
    worker.start()
    store = make_store(tmp_path / "store")
    agent = Agent(uplink_config(broker, tmp_path, "dev-pg"), "dev-pg", source=store)
    try:
        assert worker.link.wait_connected(10)
        assert worker.link.wait_subscribed(10)
        agent.start()
        add_verdicts(store, 120)
        wait_until(lambda: db.verdict_count("dev-pg") == 120, 30, "120 records in PostgreSQL")
        assert db.seqs("dev-pg") == list(range(1, 121))
        assert any(r.device == "dev-pg" and r.online for r in db.devices())
    finally:
        agent.stop()
        worker.stop()
        store.stop()
        db.close()


def test_postgres_url_without_driver_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(RuntimeError, match="pip install 'psycopg"):
        IngestDB("postgresql://nobody@127.0.0.1:1/x")
