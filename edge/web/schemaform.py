"""The Settings form, built from the configuration's JSON schema.

``LineInspectConfig.model_json_schema()`` is walked into a flat list of
:class:`FormField` (dotted key paths) grouped by section. Plain values become
inputs (checkbox, number, text, select); anything richer (lists, unions of
sections, optional sub-sections) becomes a JSON text area. A submitted form is
turned back into a nested dict, validated by the root model, and every
problem is reported against the field it belongs to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

FieldKind = Literal["bool", "int", "float", "str", "enum", "json"]


@dataclass(frozen=True, slots=True)
class FormField:
    """One input of the settings form."""

    path: str
    """Dotted key path, e.g. ``camera.source.parts_per_minute``."""
    title: str
    description: str
    kind: FieldKind
    nullable: bool = False
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    pattern: str | None = None
    depth: int = 0
    """Nesting level below the section (for indentation)."""
    group: str = ""
    """Title of the sub-section this field sits in ("" at section level)."""
    variant_of: str = ""
    """For a field of one alternative of a tagged union: the union's path (``camera.source``)."""
    variant: str = ""
    """... and the alternative's tag (``synthetic``); the path is ``<union>@<tag>.<key>``."""
    default: Any = None
    """The schema's default (shown for alternatives not currently selected)."""
    union_tag: bool = False
    """True for the selector of a tagged union (``camera.source.type``)."""

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def model_path(self) -> str:
        """Where the value goes in the config (``camera.source.seed``)."""
        if not self.variant_of:
            return self.path
        return self.variant_of + self.path[len(self.variant_of) + len(self.variant) + 1 :]

    @property
    def error_path(self) -> str:
        """How pydantic locates errors of this field (tag included for unions)."""
        if not self.variant_of:
            return self.path
        return (
            f"{self.variant_of}.{self.variant}"
            + self.path[len(self.variant_of) + len(self.variant) + 1 :]
        )


@dataclass(frozen=True, slots=True)
class FormSection:
    key: str
    title: str
    description: str
    fields: tuple[FormField, ...]


@dataclass
class FormResult:
    """A parsed form: the validated model, or per-field problems."""

    model: BaseModel | None = None
    errors: dict[str, str] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)
    """What the user typed, per field, to show it again next to its error."""


def _resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if ref is None and "allOf" in node and len(node["allOf"]) == 1:
        ref = node["allOf"][0].get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        merged = dict(schema["$defs"][ref.split("/")[-1]])
        for k in ("title", "description", "default"):
            if k in node:
                merged[k] = node[k]
        return merged
    return node


def _split_nullable(node: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, bool]:
    """(the single non-null alternative or None when several, nullable?)."""
    alts = node.get("anyOf")
    if not isinstance(alts, list):
        return node, False
    non_null = [a for a in alts if a.get("type") != "null"]
    nullable = len(non_null) < len(alts)
    if len(non_null) == 1:
        merged = dict(non_null[0])
        for k in ("title", "description", "default"):
            if k in node:
                merged[k] = node[k]
        return merged, nullable
    return None, nullable


def _leaf(  # noqa: PLR0917
    path: str,
    node: Mapping[str, Any],
    inner: Mapping[str, Any] | None,
    nullable: bool,
    depth: int,
    group: str,
) -> FormField:
    title = str(node.get("title") or path.rsplit(".", 1)[-1])
    desc = str(node.get("description") or "")
    common: dict[str, Any] = {
        "default": node.get("default"),
        "path": path,
        "title": title,
        "description": desc,
        "nullable": nullable,
        "depth": depth,
        "group": group,
    }
    if inner is None:
        return FormField(kind="json", **common)
    if "enum" in inner or "const" in inner:
        opts = inner.get("enum") or [inner.get("const")]
        if all(isinstance(o, str) for o in opts):
            return FormField(kind="enum", options=tuple(opts), **common)
        return FormField(kind="json", **common)
    typ = inner.get("type")
    bounds: dict[str, Any] = {
        "minimum": inner.get("minimum"),
        "maximum": inner.get("maximum"),
        "exclusive_minimum": inner.get("exclusiveMinimum"),
        "exclusive_maximum": inner.get("exclusiveMaximum"),
    }
    if typ == "boolean" and not nullable:
        return FormField(kind="bool", **common)
    if typ == "integer":
        return FormField(kind="int", **bounds, **common)
    if typ == "number":
        return FormField(kind="float", **bounds, **common)
    if typ == "string":
        return FormField(kind="str", pattern=inner.get("pattern"), **common)
    return FormField(kind="json", **common)


def _walk(  # noqa: PLR0917
    schema: Mapping[str, Any],
    obj: Mapping[str, Any],
    prefix: str,
    depth: int,
    group: str,
    out: list[FormField],
) -> None:
    for name, raw in obj.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        node = _resolve(schema, raw)
        if _walk_union(schema, node, path, depth, out):
            continue
        inner, nullable = _split_nullable(node)
        if inner is not None:
            inner = _resolve(schema, inner)
        if (
            inner is not None
            and not nullable
            and inner.get("type") == "object"
            and "properties" in inner
        ):
            sub_group = str(node.get("title") or name)
            _walk(schema, inner, path, depth + 1, sub_group, out)
            continue
        out.append(_leaf(path, node, inner, nullable, depth, group))


def _walk_union(
    schema: Mapping[str, Any],
    node: Mapping[str, Any],
    path: str,
    depth: int,
    out: list[FormField],
) -> bool:
    """A tagged union (pydantic discriminated union): a selector plus each alternative."""
    alts = node.get("oneOf")
    disc = node.get("discriminator")
    if not isinstance(alts, list) or not isinstance(disc, Mapping):
        return False
    tag_key = str(disc.get("propertyName") or "type")
    variants: list[tuple[str, Mapping[str, Any]]] = []
    for alt in alts:
        sub = _resolve(schema, alt)
        tag_node = sub.get("properties", {}).get(tag_key, {})
        tag = (
            tag_node.get("const") or (tag_node.get("enum") or [None])[0] or tag_node.get("default")
        )
        if not isinstance(tag, str) or "properties" not in sub:
            return False
        variants.append((tag, sub))
    title = str(node.get("title") or path.rsplit(".", 1)[-1])
    out.append(
        FormField(
            path=f"{path}.{tag_key}",
            title=title,
            description=str(node.get("description") or ""),
            kind="enum",
            options=tuple(t for t, _ in variants),
            depth=depth,
            group=title,
            union_tag=True,
        )
    )
    for tag, sub in variants:
        group = f"{title}: {tag}"
        start = len(out)
        trimmed = {
            **sub,
            "properties": {k: v for k, v in sub["properties"].items() if k != tag_key},
        }
        _walk(schema, trimmed, f"{path}@{tag}", depth + 1, group, out)
        for i in range(start, len(out)):
            f = out[i]
            out[i] = dataclasses.replace(
                f, variant_of=f.variant_of or path, variant=f.variant or tag
            )
    return True


def build_form(schema: Mapping[str, Any]) -> tuple[FormSection, ...]:
    """The form's sections (one per top-level config section) from a JSON schema."""
    sections = []
    for key, raw in schema.get("properties", {}).items():
        node = _resolve(schema, raw)
        fields: list[FormField] = []
        inner, nullable = _split_nullable(node)
        if inner is not None and not nullable and "properties" in _resolve(schema, inner):
            _walk(schema, _resolve(schema, inner), key, 0, "", fields)
        else:
            fields.append(_leaf(key, node, inner, nullable, 0, ""))
        sections.append(
            FormSection(
                key,
                str(node.get("title") or key),
                str(node.get("description") or ""),
                tuple(fields),
            )
        )
    return tuple(sections)


def get_path(data: Mapping[str, Any], path: str) -> Any:
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def display_value(f: FormField, value: Any) -> str:
    """The text shown in a field's input for a config value."""
    if value is None:
        return ""
    if f.kind == "json":
        return json.dumps(value, indent=1, ensure_ascii=False)
    if f.kind == "bool":
        return "true" if value else ""
    return str(value)


def _convert(f: FormField, text: str | None) -> Any:
    if f.kind == "bool":
        return text is not None and text not in {"", "false", "0", "off"}
    text = (text or "").strip()
    if text == "" and (f.nullable or f.kind == "json"):
        if f.nullable:
            return None
        raise ValueError("a value is required")
    if f.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("enter a whole number") from None
    if f.kind == "float":
        try:
            num = float(text)
        except ValueError:
            raise ValueError("enter a number") from None
        if not math.isfinite(num):
            raise ValueError("enter a finite number")
        return num
    if f.kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})") from None
    return text


def parse_form(
    sections: tuple[FormSection, ...],
    form: Mapping[str, str],
    current: Mapping[str, Any],
    model: type[BaseModel],
    editable: set[str],
) -> FormResult:
    """Turn a submitted form into a validated config.

    ``current`` is the config in force (``model_dump(mode="json")``); fields
    whose section is not in ``editable`` keep their current value whatever was
    submitted.
    """
    data: dict[str, Any] = json.loads(json.dumps(current))
    result = FormResult()
    owners: list[tuple[str, str]] = []
    chosen: dict[str, str] = {}
    for sec in sections:
        for f in sec.fields:
            if f.union_tag and sec.key in editable:
                union = f.path.rsplit(".", 1)[0]
                tag = form.get(f.path) or str(get_path(current, f.path) or "")
                chosen[union] = tag
                set_path(data, union, {f.path.rsplit(".", 1)[1]: tag})
                result.raw[f.path] = tag
    for sec in sections:
        for f in sec.fields:
            owners.append((f.error_path, f.path))
            if sec.key not in editable or f.union_tag:
                continue
            if f.variant_of and chosen.get(f.variant_of) != f.variant:
                continue
            text = form.get(f.path)
            if text is not None:
                result.raw[f.path] = text
            try:
                set_path(data, f.model_path, _convert(f, text))
            except ValueError as exc:
                result.errors[f.path] = str(exc)
    if result.errors:
        return result
    try:
        result.model = model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            err_path, key = _owner(owners, loc)
            msg = err["msg"]
            rest = loc[len(err_path.split(".")) :] if err_path else loc
            if rest:
                msg = f"{'.'.join(rest)}: {msg}"
            result.errors[key] = (result.errors[key] + "; " + msg) if key in result.errors else msg
    return result


def _owner(owners: list[tuple[str, str]], loc: list[str]) -> tuple[str, str]:
    """(error path, field path) of the form field a validation error belongs to."""
    best = ("", "")
    for err_path, field_path in owners:
        parts = err_path.split(".")
        if loc[: len(parts)] == parts and len(err_path) > len(best[0]):
            best = (err_path, field_path)
    if best[1]:
        return best
    # Error on an object itself (a model validator, a bad tag): its first field.
    for n in range(len(loc), 0, -1):
        prefix = ".".join(loc[:n])
        for err_path, field_path in owners:
            if err_path.startswith(prefix + "."):
                return prefix, field_path
    whole = ".".join(loc) or "(root)"
    return whole, whole


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested dict (lists are leaves)."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Changed dotted keys between two config dumps: key -> (old, new)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
