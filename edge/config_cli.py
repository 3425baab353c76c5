"""``lineinspect config check | schema | docs | defaults`` (see edge.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_INVALID = 2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``lineinspect config ...``."""
    p = sub.add_parser(
        "config",
        help="check a configuration file, print its schema or docs",
        description="Work with the LineInspect configuration file.",
    )
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: _usage(p))

    check = csub.add_parser(
        "check",
        help="validate a configuration file",
        description="Validate FILE and report every problem with its key path, line and a "
        "hint. Exit code 0 when the file is fine, 2 otherwise.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--json", action="store_true", help="print the result as JSON (for tools and the web panel)"
    )
    check.set_defaults(func=_cmd_check)

    schema = csub.add_parser("schema", help="print the JSON schema of the configuration")
    schema.add_argument("--out", type=Path, help="write to this file instead of stdout")
    schema.set_defaults(func=_cmd_schema)

    docs = csub.add_parser(
        "docs",
        help="print the Markdown configuration reference",
        description="Print the configuration reference generated from the "
        "schema (docs/config.md holds this output).",
    )
    docs.add_argument("--out", type=Path, help="write to this file instead of stdout")
    docs.set_defaults(func=_cmd_docs)

    defaults = csub.add_parser("defaults", help="print the built-in defaults as YAML")
    defaults.set_defaults(func=_cmd_defaults)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_INVALID


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")


def _cmd_check(args: argparse.Namespace) -> int:
    from edge.config import ConfigError, load_config

    path: Path = args.file
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            problems = [
                {"key": p.key, "message": p.message, "hint": p.hint, "line": p.line}
                for p in exc.details
            ]
            print(json.dumps({"file": str(path), "ok": False, "problems": problems}, indent=2))
        else:
            n = len(exc.details)
            print(f"{path}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
            print(exc.report(), file=sys.stderr)
        return EXIT_INVALID
    notes = _notes(config)
    if args.json:
        print(json.dumps({"file": str(path), "ok": True, "problems": [], "notes": notes}, indent=2))
    else:
        for note in notes:
            print(f"{path}: note: {note}")
        print(f"{path}: OK")
    return EXIT_OK


def _notes(config: Any) -> list[str]:
    """Things that are valid but worth knowing (they do not change the exit code)."""
    notes: list[str] = []
    source = config.camera.source
    path = getattr(source, "path", None)
    if isinstance(path, Path) and not path.exists():
        notes.append(
            f"camera.source.path: {path} does not exist yet (the capture loop keeps "
            "retrying until it appears)"
        )
    notes.extend(_secret_notes(config, ""))
    return notes


def _secret_notes(node: Any, prefix: str) -> list[str]:
    """Secrets of enabled parts whose environment variable is unset and file missing."""
    import os

    from pydantic import BaseModel

    from edge.config_base import SecretRef

    if isinstance(node, SecretRef):
        if node.env and os.environ.get(node.env):
            return []
        if node.file is not None and node.file.is_file():
            return []
        sources = [w for w in (f"${node.env}" if node.env else "", str(node.file or "")) if w]
        where = " or ".join(sources) or "no env or file given"
        return [
            f"{prefix}: secret not available here ({where}: unset or missing); "
            "the part that needs it will fail to start"
        ]
    if isinstance(node, BaseModel):
        if getattr(node, "enabled", True) is False:
            return []  # a disabled part needs no secret
        out: list[str] = []
        for name in type(node).model_fields:
            child = getattr(node, name)
            out.extend(_secret_notes(child, f"{prefix}.{name}" if prefix else name))
        return out
    if isinstance(node, list | tuple):
        return [n for i, item in enumerate(node) for n in _secret_notes(item, f"{prefix}.{i}")]
    return []


def _schema_text() -> str:
    from edge.config import LineInspectConfig

    return json.dumps(LineInspectConfig.model_json_schema(), indent=2) + "\n"


def _cmd_schema(args: argparse.Namespace) -> int:
    _emit(_schema_text(), args.out)
    return EXIT_OK


def docs_markdown() -> str:
    """The configuration reference (what docs/config.md must hold)."""
    from edge.config import LineInspectConfig
    from edge.config_docs import render_markdown

    return render_markdown(LineInspectConfig.model_json_schema())


def _cmd_docs(args: argparse.Namespace) -> int:
    _emit(docs_markdown(), args.out)
    return EXIT_OK


def _cmd_defaults(_args: argparse.Namespace) -> int:
    import yaml

    from edge.config import LineInspectConfig

    data = LineInspectConfig().model_dump(mode="json")
    sys.stdout.write("# LineInspect built-in defaults (lineinspect config defaults)\n")
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return EXIT_OK
