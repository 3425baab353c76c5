"""Panel strings in English and Simplified Chinese, kept in ``i18n/<lang>.json``."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LANGUAGES: dict[str, str] = {"en": "English", "zh_CN": "简体中文"}
"""Supported languages: code -> own name."""

I18N_DIR = Path(__file__).with_name("i18n")


@cache
def strings(lang: str) -> dict[str, str]:
    """All strings of one language (a flat key -> text mapping)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r}")
    data = json.loads((I18N_DIR / f"{lang}.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{lang}.json must hold one JSON object")
    return {str(k): str(v) for k, v in data.items()}


def translate(lang: str, key: str, **values: object) -> str:
    """The text of ``key`` in ``lang`` (English, then the key itself, as fallback)."""
    text = strings(lang).get(key) or strings("en").get(key) or key
    if values:
        try:
            return text.format(**values)
        except (KeyError, IndexError, ValueError):
            return text
    return text
