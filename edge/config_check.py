"""Turn YAML text and pydantic errors into problems a person can fix.

Every problem names the key path as written in the YAML file
(``camera.source.rate_fps``), the line when known, what is wrong, and a hint:
the closest valid key for a misspelt one, the allowed values for a choice,
the field's own description otherwise. Duplicate keys, which YAML would
silently collapse, are problems too.

This module knows nothing of the root model; :mod:`edge.config` passes it in.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "private_key")
_ENV_OR_FILE_ADVICE = (
    "secrets never live in YAML: write e.g. `{key}: {{env: LINEINSPECT_{upper}}}` "
    "or `{key}: {{file: /etc/lineinspect/{key}}}`"
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration file."""

    key: str
    """Dotted key path as in the YAML file, or (file) / (yaml) / (root)."""
    message: str
    hint: str = ""
    line: int | None = None
    """1-based line in the file, when known."""

    def format(self, path: str = "") -> str:
        where = path
        if self.line:
            where = f"{path}:{self.line}" if path else f"line {self.line}"
        text = f"{where}: " if where else ""
        text += f"{self.key}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class YamlProblemsError(Exception):
    """The text is not usable YAML; ``problems`` says where."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def load_yaml(text: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """Parse YAML; return the data, the line of every key path, and duplicate-key problems.

    Raises :class:`YamlProblemsError` for a syntax error (with its line).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(s for s in (exc.context, exc.problem) if s) or str(exc)
        raise YamlProblemsError(
            [
                Problem(
                    "(yaml)",
                    f"invalid YAML: {what}",
                    "fix the YAML syntax (indent with spaces, "
                    "`key: value`, quote values holding ': ' or '#')",
                    line,
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise YamlProblemsError(
            [Problem("(yaml)", f"invalid YAML: {exc}", "fix the YAML syntax")]
        ) from None
    lines: dict[str, int] = {}
    dupes: list[Problem] = []
    if node is not None:
        _walk_nodes(node, "", lines, dupes)
    return data, lines, dupes


def _walk_nodes(node: yaml.Node, prefix: str, lines: dict[str, int], dupes: list[Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                dupes.append(
                    Problem(
                        path,
                        f"duplicate key (first on line {seen[key]})",
                        "keep one: YAML would silently use the last",
                        line,
                    )
                )
            seen[key] = line
            lines.setdefault(path, line)
            _walk_nodes(value_node, path, lines, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}"
            lines.setdefault(path, item.start_mark.line + 1)
            _walk_nodes(item, path, lines, dupes)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    found: list[type[BaseModel]] = []
    if origin in {typing.Union, types.UnionType, list, tuple, dict, set, frozenset}:
        for arg in args[1:] if origin is dict else args:
            found.extend(_models_in(arg))
    return found


def _tag_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    return None if field is None else field.default


def _resolve(
    root: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[list[type[BaseModel]], FieldInfo | None]:
    """The models that could hold the last key of ``loc``, and that key's field."""
    models: list[type[BaseModel]] = [root]
    containers = models
    field: FieldInfo | None = None
    for seg in loc:
        if isinstance(seg, int):
            continue
        containers = models
        owner = next((m for m in models if seg in m.model_fields), None)
        if owner is not None:
            field = owner.model_fields[seg]
            models = _models_in(field.annotation)
            continue
        tagged = [m for m in models if _tag_of(m) == seg]
        if tagged:
            models = tagged
            continue
        field = None
        break
    return containers, field


def _display_key(loc: tuple[int | str, ...], data: Any) -> str:
    """The key path as the user wrote it: no union tags or union member names."""
    parts: list[str] = []
    cur = data
    for i, seg in enumerate(loc):
        in_dict = isinstance(cur, dict) and seg in cur
        in_list = isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur)
        if in_dict or in_list:
            parts.append(str(seg))
            cur = cur[seg]
        elif isinstance(cur, dict) and i == len(loc) - 1:
            parts.append(str(seg))  # a missing key
        elif not isinstance(cur, dict | list):
            break  # a union member name below a scalar
        # else: a discriminator tag or union member name: not part of the YAML path
    return ".".join(parts) or "(root)"


def _looks_secret(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in SECRET_WORDS)


def _secret_hint(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return _ENV_OR_FILE_ADVICE.format(key=last, upper=last.upper())


def _hint(err: Any, key: str, containers: list[type[BaseModel]], field: FieldInfo | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    last = key.rsplit(".", 1)[-1]
    if kind == "extra_forbidden":
        allowed = sorted({k for m in containers for k in m.model_fields})
        if _looks_secret(last):
            return _secret_hint(key) + " (and only where a section has such a key)"
        close = difflib.get_close_matches(last, allowed, n=1, cutoff=0.6)
        lead = f"did you mean '{close[0]}'? " if close else "remove it or check its spelling; "
        return lead + "allowed here: " + ", ".join(allowed)
    if kind in {"model_type", "model_attributes_type", "dict_type"} and (
        ctx.get("class_name") == "SecretRef" or _looks_secret(last)
    ):
        return _secret_hint(key)
    if kind == "union_tag_invalid":
        return "set 'type' to one of: " + str(ctx.get("expected_tags", ""))
    if kind == "union_tag_not_found":
        tags = ", ".join(str(_tag_of(m)) for m in containers) if containers else ""
        return "add a 'type:' key" + (f" (one of: {tags})" if tags else "")
    if kind == "literal_error":
        return "use one of: " + str(ctx.get("expected", ""))
    if kind == "missing":
        desc = field.description if field is not None and field.description else ""
        return f"add '{last}:' here" + (f" ({desc})" if desc else "")
    if kind == "enum":
        return "use one of: " + str(ctx.get("expected", ""))
    if field is not None and field.description:
        title = f"{field.title}: " if field.title else ""
        return title + field.description
    return ""


def _short(value: Any) -> str | None:
    if isinstance(value, dict | list):
        return None
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(
    root: type[BaseModel], exc: ValidationError, data: Any, lines: dict[str, int]
) -> list[Problem]:
    """Translate a ValidationError into problems keyed by YAML path (merged per key)."""
    merged: dict[str, Problem] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = _display_key(loc, data)
        containers, field = _resolve(root, loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] != "missing" and not _looks_secret(key):  # never echo a secret
            got = _short(err.get("input"))
            if got is not None:
                message += f" (got {got})"
        hint = _hint(err, key, containers, field)
        line = _line_for(key, lines)
        if key in merged:
            old = merged[key]
            if message not in old.message:
                merged[key] = Problem(
                    key, f"{old.message}; or {message}", old.hint or hint, old.line
                )
        else:
            merged[key] = Problem(key, message, hint, line)
    return list(merged.values())


def _line_for(key: str, lines: dict[str, int]) -> int | None:
    parts = key.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        parts.pop()
    return None
