"""What every benchmark does with its result: print it as JSON, and write it to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_json(result: Any, path: Path | None, *, indent: int = 2) -> None:
    """Print ``result`` as JSON; with ``path``, also write it there (parents created)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
