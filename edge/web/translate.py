"""Panel strings in English and Simplified Chinese, kept in ``i18n/``.

- ``<lang>.json``: the panel's own strings (flat key -> text), every language.
- ``<lang>.schema.json``: the Settings page's titles, descriptions and option
  labels, keyed by the dotted key path of each config section, sub-section,
  union alternative (``camera.source@device``) and field. English has none:
  its text is the configuration schema's own.
- ``<lang>.validation.json``: validation messages by pydantic error type, with
  the error's context as placeholders; ``_fallback`` wraps any other message.
  English has none: pydantic's own messages are English.

``python -m edge.web.translate`` lists what the schema catalogue of a language
lacks (new fields, changed English text) and what it holds that no longer
exists; ``--stub`` prints the missing entries as JSON to fill in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

LANGUAGES: dict[str, str] = {"en": "English", "zh_CN": "简体中文"}
"""Supported languages: code -> own name."""

I18N_DIR = Path(__file__).with_name("i18n")


def _load_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold one JSON object")
    return data


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r}")


@cache
def strings(lang: str) -> dict[str, str]:
    """All strings of one language (a flat key -> text mapping)."""
    _check_lang(lang)
    return {str(k): str(v) for k, v in _load_object(I18N_DIR / f"{lang}.json").items()}


def translate(lang: str, key: str, **values: object) -> str:
    """The text of ``key`` in ``lang`` (English, then the key itself, as fallback)."""
    text = strings(lang).get(key) or strings("en").get(key) or key
    if values:
        try:
            return text.format(**values)
        except (KeyError, IndexError, ValueError):
            return text
    return text


def schema_catalog_path(lang: str) -> Path:
    return I18N_DIR / f"{lang}.schema.json"


@cache
def schema_catalog(lang: str) -> dict[str, Any]:
    """The Settings page's translations of one language: dotted key path -> entry.

    An entry is ``{"title", "description", "options": {value: label}, "src"}``
    (``src``: the digest of the English text it translates, see
    :attr:`edge.web.schemaform.SourceText.digest`). Empty for a language
    without a catalogue (English shows the schema's own text).
    """
    _check_lang(lang)
    path = schema_catalog_path(lang)
    return _load_object(path) if path.is_file() else {}


@cache
def validation_catalog(lang: str) -> dict[str, str]:
    """Validation message templates of one language by pydantic error type ({} for English)."""
    _check_lang(lang)
    path = I18N_DIR / f"{lang}.validation.json"
    if not path.is_file():
        return {}
    return {str(k): str(v) for k, v in _load_object(path).items()}


def validation_message(lang: str, error: Mapping[str, Any]) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in ``lang``.

    A known error type is rendered from its template with the error's context
    (``greater_than`` -> "必须大于 0"); any other message (a model's own
    validator, in English) is wrapped in the language's ``_fallback`` so the
    reader still learns what kind of problem it is.
    """
    msg = str(error.get("msg", ""))
    cat = validation_catalog(lang)
    if not cat:
        return msg
    joiner = cat.get("_or", " or ")
    ctx = {
        str(k): str(v).replace(" or ", joiner) if str(k).startswith("expected") else str(v)
        for k, v in (error.get("ctx") or {}).items()
    }
    template = cat.get(str(error.get("type", "")))
    if template:
        try:
            return template.format(**ctx)
        except (KeyError, IndexError, ValueError):
            pass
    return cat.get("_fallback", "{msg}").replace("{msg}", msg)


def main(argv: Sequence[str] | None = None) -> int:
    """List the gaps of a schema catalogue against the live configuration schema."""
    from edge.config import LineInspectConfig
    from edge.web.schemaform import build_form, check_catalog, source_texts

    ap = argparse.ArgumentParser(
        prog="python -m edge.web.translate",
        description="Check a language's Settings translations against the config schema.",
    )
    ap.add_argument("--lang", default="zh_CN", choices=[k for k in LANGUAGES if k != "en"])
    ap.add_argument(
        "--stub",
        action="store_true",
        help="print the missing and stale entries as JSON (English text to translate, "
        "with the src digest to keep)",
    )
    args = ap.parse_args(argv)
    sources = source_texts(build_form(LineInspectConfig.model_json_schema()))
    check = check_catalog(sources, schema_catalog(args.lang))
    if args.stub:
        stub: dict[str, Any] = {}
        for key in [*check.missing, *check.stale]:
            src = sources[key]
            entry: dict[str, Any] = {"title": src.title, "description": src.description}
            if src.options:
                entry["options"] = {o: o for o in src.options}
            entry["src"] = src.digest
            stub[key] = entry
        print(json.dumps(stub, ensure_ascii=False, indent=1))
    else:
        print(check.report(schema_catalog_path(args.lang).name) or "complete")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
