"""Sub-commands of this package (see edge.cli): ``lineinspect plc-sim``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's sub-commands."""
    p = sub.add_parser(
        "plc-sim",
        help="play the line's PLC against a running appliance (Modbus)",
        description="Trigger parts at a set rate with unique ids, follow the Modbus "
        "handshake, check every echoed id and report latency, missed, late, mismatched "
        "and ERROR results.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="server mode: the appliance's address; client mode: address to "
        "listen on as the PLC (default 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=5020, help="Modbus TCP port (default 5020)")
    p.add_argument(
        "--mode",
        choices=("server", "client"),
        default="server",
        help="the appliance's plc.mode (default server: the simulator polls it)",
    )
    p.add_argument(
        "--ppm", type=_positive(float), default=600.0, help="parts per minute (default 600)"
    )
    p.add_argument(
        "--parts", type=_positive(int), default=100, help="parts to trigger (default 100)"
    )
    p.add_argument(
        "--poll-ms", type=_positive(float), default=2.0, help="PLC scan time in ms (default 2)"
    )
    p.add_argument(
        "--late-ms",
        type=_positive(float),
        default=500.0,
        help="a result later than this counts as late (default 500)",
    )
    p.add_argument(
        "--word-order",
        choices=("high_first", "low_first"),
        default="high_first",
        help="must match plc.word_order",
    )
    p.add_argument("--base-address", type=int, default=0, help="must match plc.base_address")
    p.add_argument("--unit-id", type=int, default=1, help="Modbus unit id (default 1)")
    p.add_argument("--first-part-id", type=int, default=1, help="first part id (default 1)")
    p.add_argument(
        "--respect-ready",
        action="store_true",
        help="hold a due trigger until READY (default: trigger on schedule)",
    )
    p.add_argument(
        "--timeout-s",
        type=_positive(float),
        default=10.0,
        help="wait this long for the appliance (default 10)",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write the report (with every latency) as JSON",
    )
    p.set_defaults(func=_run_sim)


def _run_sim(args: argparse.Namespace) -> int:
    from plc.sim import SimSettings, SimulatorError, run_line, write_json

    if not 0 <= args.first_part_id <= 0xFFFFFFFF:
        print("error: --first-part-id must be 0..4294967295", file=sys.stderr)
        return 2
    settings = SimSettings(
        host=args.host,
        port=args.port,
        mode=args.mode,
        ppm=args.ppm,
        parts=args.parts,
        poll_interval_ms=args.poll_ms,
        word_order=args.word_order,
        base_address=args.base_address,
        unit_id=args.unit_id,
        first_part_id=args.first_part_id,
        late_ms=args.late_ms,
        connect_timeout_s=args.timeout_s,
        respect_ready=args.respect_ready,
    )
    try:
        report = run_line(settings)
    except (SimulatorError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    if args.json:
        try:
            write_json(report, args.json)
        except OSError as exc:
            print(f"error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 1
    else:
        print(json.dumps(report.to_dict()))
    return 0 if report.clean else 3
