"""`lineinspect run`, `demo`, `doctor` and `engine-build` (see edge.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.config import LineInspectConfig

log = logging.getLogger("lineinspect")


def _load_config(path: Path | None) -> LineInspectConfig:
    from edge.config import LineInspectConfig, load_config

    return load_config(path) if path is not None else LineInspectConfig()


def _config_error(exc: Exception) -> int:
    from edge.config import ConfigError

    if isinstance(exc, ConfigError):
        print(f"configuration error in {exc.path or '(defaults)'}:", file=sys.stderr)
        for key, msg, hint in exc.problems:
            print(f"  {key}: {msg}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 2


def _print_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_run(args: argparse.Namespace) -> int:
    from edge.app import Appliance, ApplianceError, PrintVerdicts
    from edge.config import ConfigError

    try:
        cfg = _load_config(args.config)
    except ConfigError as exc:
        return _config_error(exc)
    sinks = [PrintVerdicts(_print_line)] if args.print_verdicts else []
    app = Appliance(
        cfg,
        config_path=args.config,
        sinks=sinks,
        stats_interval_s=args.stats_interval,
        stats_printer=_print_line,
    )
    try:
        return app.run_forever()
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    from edge.config import ConfigError
    from edge.doctor import diagnose, format_report

    try:
        cfg = _load_config(args.config)
    except ConfigError as exc:
        return _config_error(exc)
    report = diagnose(cfg)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.choice is None or report.choice.selected is not None else 1


def _cmd_engine_build(args: argparse.Namespace) -> int:
    from edge.config import ConfigError
    from edge.doctor import build_engines

    try:
        cfg = _load_config(args.config)
        for line in build_engines(cfg):
            print(line)
    except ConfigError as exc:
        return _config_error(exc)
    except Exception as exc:
        print(f"engine build failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge.app import Appliance, ApplianceError
    from edge.demo import (
        DemoOptions,
        demo_config,
        demo_graph,
        ensure_demo_model,
        start_line_simulator,
    )

    if args.verbose < 2:  # one Modbus audit line per register write drowns the statistics
        logging.getLogger("plc.audit").setLevel(logging.WARNING)
    opts = DemoOptions(
        workdir=args.workdir,
        cache_dir=args.cache,
        plc=not args.no_plc,
        plc_port=args.plc_port,
        panel=not args.no_panel,
        panel_port=args.panel_port,
        ppm=args.ppm,
    )
    try:
        package = ensure_demo_model(opts, progress=_print_line)
    except Exception as exc:
        print(f"demo: could not prepare the demo model: {exc}", file=sys.stderr)
        return 1
    cfg = demo_config(opts, package, graph=demo_graph(package))
    app = Appliance(cfg, stats_interval_s=args.stats_interval, stats_printer=_print_line)
    sim: Any = None

    def started() -> None:
        nonlocal sim
        if opts.plc:
            sim = start_line_simulator(opts)
            if sim is not None:
                _print_line(
                    f"line simulator: {opts.ppm:g} parts/min over Modbus 127.0.0.1:{opts.plc_port}"
                )
        if opts.panel:
            _print_line(f"panel: http://127.0.0.1:{opts.panel_port}/")
        _print_line("press Ctrl-C to stop")

    try:
        return app.run_forever(on_started=started, before_stop=lambda: sim and sim.stop())
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``run``, ``demo``, ``doctor`` and ``engine-build``."""
    p = sub.add_parser(
        "run",
        help="run the appliance with a configuration file",
        description="Start store, backend, pipeline, capture and (when "
        "configured) PLC, panel and uplink; stop cleanly on SIGTERM/SIGINT.",
    )
    p.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    p.add_argument(
        "--print-verdicts",
        action="store_true",
        help="print one line per verdict on stdout (after it is stored)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="print frame rate, drops and verdict counts every S seconds",
    )
    p.add_argument(
        "--no-uplink",
        action="store_true",
        help="do not start the uplink agent in this process (it runs as its own "
        "service, `lineinspect agent`); the appliance follows the model slots",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        help="inspect the synthetic line (no camera, no config needed)",
        description="Teach a demo model on first start (cached afterwards), "
        "then inspect the synthetic line, with the PLC simulator on Modbus "
        "and the panel on loopback.",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("var/demo"),
        help="results, panel data (default var/demo)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/lineinspect").expanduser(),
        help="where the taught demo model is kept (default ~/.cache/lineinspect)",
    )
    p.add_argument("--no-plc", action="store_true", help="free-run without the PLC simulator")
    p.add_argument("--plc-port", type=int, default=5020, help="Modbus TCP port (default 5020)")
    p.add_argument("--no-panel", action="store_true", help="do not serve the web panel")
    p.add_argument("--panel-port", type=int, default=8080, help="panel port (default 8080)")
    p.add_argument("--ppm", type=float, default=120.0, help="parts per minute (default 120)")
    p.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="print statistics every S seconds (default 5)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "doctor",
        help="what this machine offers: providers, TensorRT, cameras",
        description="Report ONNX Runtime providers, TensorRT/CUDA, Jetson "
        "power mode, camera devices and which backend the config would get.",
    )
    p.add_argument("--config", type=Path, help="configuration file (default: built-in)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser(
        "engine-build",
        help="build and cache TensorRT engines (first boot)",
        description="Build the TensorRT engine(s) the configuration's backends "
        "need for its model package, so the first part is not slow.",
    )
    p.add_argument("--config", type=Path, required=True, help="configuration file")
    p.set_defaults(func=_cmd_engine_build)
