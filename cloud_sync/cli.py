"""Sub-commands of this package (see edge.cli): ``agent`` and ``fleet ...``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's sub-commands."""
    p = sub.add_parser(
        "agent",
        help="run the MQTT device agent (telemetry, logs, updates)",
        description="Run the MQTT device agent alone, next to a running "
        "appliance (it reads the result store and the model slots).",
    )
    p.add_argument("--config", "-c", type=Path, required=True, help="LineInspect YAML file")
    p.set_defaults(func=_cmd_agent)

    from cloud_sync.fleet_cli import register_fleet

    register_fleet(sub)


def _cmd_agent(args: argparse.Namespace) -> int:
    from cloud_sync.agent import agent_from_config
    from cloud_sync.edge_link import open_result_store
    from edge.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.uplink.enabled:
        print("error: uplink.enabled is false in the configuration", file=sys.stderr)
        return 2
    store = open_result_store(cfg.store)
    try:
        agent = agent_from_config(cfg, source=store)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        store.stop()
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
        store.stop()
    return 0
