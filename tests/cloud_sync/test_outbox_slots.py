"""Outbox, payload schemas and model slots on real SQLite files and folders (no broker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.outbox import NewRecord, Outbox
from cloud_sync.slots import SlotError, SlotStore, active_package_path
from cloud_sync.topics import (
    LogBatch,
    PayloadError,
    ReleaseCommand,
    decode_chunk,
    encode_chunk,
    parse_payload,
    semver_key,
)


def rec(code: str, i: int, pad: int = 0) -> NewRecord:
    return NewRecord(code, {"inspection_id": i % 10, "pad": "x" * pad})


def test_sequences_are_contiguous_and_survive_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", 10_000_000)
    assert ob.append([rec("OK", 1), rec("NG", 2)], feed_cursor=2) == [1, 2]
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", 10_000_000)
    assert ob.feed_cursor() == 2
    assert ob.append([rec("OK", 3)], feed_cursor=3) == [3]
    assert [r.seq for r in ob.peek(0, 10)] == [1, 2, 3]
    assert ob.ack(1, 2) == 2
    assert [r.seq for r in ob.peek(0, 10)] == [3]
    # sequences are never reused, even after everything was acknowledged
    ob.ack(3, 3)
    assert ob.append([rec("OK", 4)]) == [4]
    assert ob.depth() == 1


def test_quota_drops_ok_first_then_error_and_ng_last(tmp_path: Path) -> None:
    one = len(json.dumps(rec("OK", 1, 100).fields, separators=(",", ":")))
    ob = Outbox(tmp_path / "o.sqlite", quota_bytes=one * 10)
    ob.append([rec("NG", i, 100) for i in range(3)])
    ob.append([rec("ERROR", i, 100) for i in range(3)])
    ob.append([rec("OK", i, 100) for i in range(4)])
    assert ob.depth() == 10
    ob.append([rec("NG", 9, 100)] * 3)  # 3 over quota: 3 oldest OK records go
    d = ob.dropped()
    assert (d.ok, d.error, d.ng) == (3, 0, 0)
    ob.append([rec("NG", 9, 100)] * 3)  # last OK, then 2 ERROR
    d = ob.dropped()
    assert (d.ok, d.error, d.ng) == (4, 2, 0)
    codes = [r.code for r in ob.peek(0, 100)]
    assert codes.count("OK") == 0
    assert codes.count("NG") == 9
    assert ob.size_bytes() <= one * 10
    ob.append([rec("NG", 9, 100)] * 3)  # 1 ERROR, then the oldest NG
    d = ob.dropped()
    assert (d.ok, d.error, d.ng) == (4, 3, 2)


def test_bad_code_rolls_back_the_whole_append(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    with pytest.raises(ValueError, match="unknown verdict code"):
        ob.append([rec("OK", 1), rec("MAYBE", 2)], feed_cursor=2)
    assert ob.depth() == 0
    assert ob.feed_cursor() == 0
    assert ob.append([rec("OK", 1)]) == [1]


_HAMMER = """
import sys
from pathlib import Path
from cloud_sync.outbox import NewRecord, Outbox
ob = Outbox(Path(sys.argv[1]), 100_000_000)
i = 0
while True:
    i += 1
    ob.append([NewRecord("OK", {"inspection_id": i})], feed_cursor=i)
"""


def test_kill_during_appends_keeps_cursor_and_records_consistent(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    p = subprocess.Popen([sys.executable, "-c", _HAMMER, str(path)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (path.exists() and path.stat().st_size > 0):
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ob = Outbox(path, 100_000_000)
    rows = ob.peek(0, 1_000_000)
    assert rows, "the child wrote nothing"
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert ob.feed_cursor() == rows[-1].fields["inspection_id"] == len(rows)


def test_payloads_reject_malformed_and_oversized() -> None:
    with pytest.raises(PayloadError, match="larger than"):
        parse_payload(LogBatch, b"{}" * 100, 50)
    with pytest.raises(PayloadError, match="not UTF-8 JSON"):
        parse_payload(LogBatch, b"\xff", 50)
    with pytest.raises(PayloadError, match="records"):
        parse_payload(
            LogBatch,
            json.dumps(
                {"device": "d", "first_seq": 1, "last_seq": 1, "sent_unix": 0, "records": []}
            ).encode(),
            10_000,
        )
    with pytest.raises(PayloadError, match="Extra inputs"):
        parse_payload(ReleaseCommand, b'{"action":"install","release_id":"r","x":1}', 1000)
    with pytest.raises(PayloadError, match="magic"):
        decode_chunk(b"XXXX" + b"\0" * 30)
    with pytest.raises(PayloadError, match="shorter"):
        decode_chunk(b"LIC1")
    assert decode_chunk(encode_chunk("rel-1", 7, b"abc")) == ("rel-1", 7, b"abc")


def test_semver_order() -> None:
    assert semver_key("1.2.0") > semver_key("1.2.0-rc.1") > semver_key("1.1.9")
    assert semver_key("1.10.0") > semver_key("1.9.0")
    with pytest.raises(ValueError, match="semantic"):
        semver_key("1.2")


def test_slots_activate_rollback_and_pointer_atomicity(tmp_path: Path) -> None:
    s = SlotStore(tmp_path / "slots")
    assert active_package_path(tmp_path / "slots") is None
    a = tmp_path / "a.tar"
    a.write_bytes(b"A" * 100)
    b = tmp_path / "b.tar"
    b.write_bytes(b"B" * 100)
    s.install(a, "m-1.0.0-aaaaaaaa", "1.0.0", "m")
    assert active_package_path(tmp_path / "slots") == s.package_path("m-1.0.0-aaaaaaaa")
    s.add_package(b, "m-1.1.0-bbbbbbbb")
    s.stage("m-1.1.0-bbbbbbbb", "1.1.0", "m")
    ptr = s.activate_staged()
    assert (ptr.active, ptr.previous, ptr.staged) == ("m-1.1.0-bbbbbbbb", "m-1.0.0-aaaaaaaa", None)
    assert ptr.version_of(ptr.active) == "1.1.0"
    assert ptr.name_of(ptr.active) == "m"
    ptr = s.rollback()
    assert (ptr.active, ptr.previous, ptr.rejected) == (
        "m-1.0.0-aaaaaaaa",
        None,
        "m-1.1.0-bbbbbbbb",
    )
    assert active_package_path(tmp_path / "slots").read_bytes() == b"A" * 100  # type: ignore[union-attr]
    with pytest.raises(SlotError, match="no previous"):
        s.rollback()
    with pytest.raises(SlotError, match="no staged"):
        s.activate_staged()
    with pytest.raises(SlotError, match="has no package"):
        s.stage("never-written", "9.9.9")
    # a half-written slot left by a kill is cleaned and never named by the pointer
    (s.packages / ".tmp-x").mkdir()
    SlotStore(tmp_path / "slots")
    assert not (s.packages / ".tmp-x").exists()
    roles = {i.name: i.role for i in s.describe()}
    assert roles == {"m-1.0.0-aaaaaaaa": "active", "m-1.1.0-bbbbbbbb": "rejected"}


def test_corrupt_pointer_is_a_clear_error(tmp_path: Path) -> None:
    s = SlotStore(tmp_path / "slots")
    (tmp_path / "slots" / "pointer.json").write_text("{not json")
    with pytest.raises(SlotError, match="corrupt"):
        s.read()
