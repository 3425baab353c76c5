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
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from edge.web.translate import schema_catalog as translation_catalog
from edge.web.translate import translate, validation_message

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
    group_key: str = ""
    """Key path of that sub-section (``camera.reconnect``, ``camera.source``, or
    ``camera.source@synthetic`` for one alternative of a union); "" at section level."""
    group_description: str = ""
    """Description of that sub-section."""
    variant_of: str = ""
    """For a field of one alternative of a tagged union: the union's path (``camera.source``)."""
    variant: str = ""
    """... and the alternative's tag (``synthetic``); the path is ``<union>@<tag>.<key>``."""
    default: Any = None
    """The schema's default (shown for alternatives not currently selected)."""
    union_tag: bool = False
    """True for the selector of a tagged union (``camera.source.type``)."""
    option_labels: tuple[str, ...] = ()
    """Text shown for each of ``options`` (same order); empty shows the values themselves."""

    @property
    def text_key(self) -> str:
        """Key of this field's title and description in a translation catalogue.

        The field's path; for the selector of a tagged union, the union's path
        (``camera.source``), whose title and description the selector shows.
        """
        return self.path.rsplit(".", 1)[0] if self.union_tag else self.path

    @property
    def labelled_options(self) -> tuple[tuple[str, str], ...]:
        """(value, text shown) of each option."""
        labels = self.option_labels if len(self.option_labels) == len(self.options) else ()
        return tuple(zip(self.options, labels or self.options, strict=True))

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


@dataclass(frozen=True, slots=True)
class _Group:
    """The sub-section fields are walked in: title, key path, description."""

    title: str = ""
    key: str = ""
    description: str = ""


def _leaf(  # noqa: PLR0917
    path: str,
    node: Mapping[str, Any],
    inner: Mapping[str, Any] | None,
    nullable: bool,
    depth: int,
    group: _Group,
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
        "group": group.title,
        "group_key": group.key,
        "group_description": group.description,
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
    group: _Group,
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
            sub_group = _Group(
                str(node.get("title") or name), path, str(node.get("description") or "")
            )
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
    description = str(node.get("description") or "")
    out.append(
        FormField(
            path=f"{path}.{tag_key}",
            title=title,
            description=description,
            kind="enum",
            options=tuple(t for t, _ in variants),
            depth=depth,
            group=title,
            group_key=path,
            group_description=description,
            union_tag=True,
        )
    )
    for tag, sub in variants:
        group = _Group(f"{title}: {tag}", f"{path}@{tag}", str(sub.get("description") or ""))
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
            _walk(schema, _resolve(schema, inner), key, 0, _Group(), fields)
        else:
            fields.append(_leaf(key, node, inner, nullable, 0, _Group()))
        sections.append(
            FormSection(
                key,
                str(node.get("title") or key),
                str(node.get("description") or ""),
                tuple(fields),
            )
        )
    return tuple(sections)


@dataclass(frozen=True, slots=True)
class SourceText:
    """The schema's own (English) text of one entry of a translation catalogue."""

    title: str
    description: str
    options: tuple[str, ...] = ()
    """Values of an enum field; a translation gives a label for each."""

    @property
    def digest(self) -> str:
        """Short hash of the title and description: a translation records the one it
        was made from, so a changed English text shows up as a stale translation."""
        text = f"{self.title}\n{self.description}".encode()
        return hashlib.sha256(text).hexdigest()[:10]


def variant_tag(group_key: str) -> str | None:
    """The tag when ``group_key`` names one alternative of a union (``camera.source@device``)."""
    last = group_key.rsplit(".", 1)[-1]
    return last.split("@", 1)[1] if "@" in last else None


def source_texts(sections: tuple[FormSection, ...]) -> dict[str, SourceText]:
    """Every entry a complete translation of the form needs, keyed by dotted key path.

    Sections (``camera``), sub-sections (``camera.reconnect``), tagged unions
    (``camera.source``, title of the union's selector), each alternative of a union
    (``camera.source@device``: its label in the selector and its description), and
    fields (``camera.source@device.fps``), with the option values of enum fields.
    """
    out: dict[str, SourceText] = {}
    variants: list[str] = []
    for sec in sections:
        out.setdefault(sec.key, SourceText(sec.title, sec.description))
        for f in sec.fields:
            if f.group_key and f.group_key not in out:
                tag = variant_tag(f.group_key)
                out[f.group_key] = SourceText(tag or f.group, f.group_description)
            if f.union_tag:
                union = f.text_key
                out.setdefault(union, SourceText(f.title, f.description))
                variants.extend(f"{union}@{tag}" for tag in f.options)
                continue
            opts = f.options if f.kind == "enum" else ()
            out.setdefault(f.path, SourceText(f.title, f.description, opts))
    for key in variants:  # alternatives without fields of their own
        out.setdefault(key, SourceText(key.rsplit("@", 1)[1], ""))
    return out


@dataclass
class CatalogCheck:
    """How a translation catalogue compares with the schema's entries."""

    missing: list[str] = field(default_factory=list)
    """Entries of the schema the catalogue lacks (a new section, field, alternative)."""
    unknown: list[str] = field(default_factory=list)
    """Catalogue keys that no longer exist in the schema."""
    stale: list[str] = field(default_factory=list)
    """Entries whose English title or description changed since they were translated."""
    problems: list[str] = field(default_factory=list)
    """Malformed entries: no title, a description missing or extra, options that differ."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unknown or self.stale or self.problems)

    def report(self, name: str = "the catalogue") -> str:
        """Human-readable list of every gap ("" when there is none)."""
        lines = []
        for what, keys in (
            (f"missing from {name}", self.missing),
            (f"in {name} but no longer in the schema", self.unknown),
            ("English text changed since translated (update the text, then src)", self.stale),
        ):
            if keys:
                lines.append(f"{what} ({len(keys)}): " + ", ".join(keys))
        lines.extend(self.problems)
        if lines:
            lines.append("list them with: python -m edge.web.translate [--stub]")
        return "\n".join(lines)


def check_catalog(sources: Mapping[str, SourceText], catalog: Mapping[str, Any]) -> CatalogCheck:
    """Compare a translation catalogue (``i18n/<lang>.schema.json``) with the schema."""
    check = CatalogCheck(
        missing=[k for k in sources if k not in catalog],
        unknown=[k for k in catalog if k not in sources],
    )
    for key, src in sources.items():
        entry = catalog.get(key)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            check.problems.append(f"{key}: not an object")
            continue
        if not isinstance(entry.get("title"), str) or not entry["title"].strip():
            check.problems.append(f"{key}: no title")
        desc = entry.get("description", "")
        if not isinstance(desc, str) or bool(desc.strip()) != bool(src.description.strip()):
            check.problems.append(
                f"{key}: description "
                + ("missing" if src.description.strip() else "given, the schema has none")
            )
        opts = entry.get("options")
        if src.options:
            if not isinstance(opts, Mapping) or set(opts) != set(src.options):
                got = sorted(opts) if isinstance(opts, Mapping) else None
                check.problems.append(
                    f"{key}: options must label exactly {list(src.options)}, got {got}"
                )
            elif not all(isinstance(v, str) and v.strip() for v in opts.values()):
                check.problems.append(f"{key}: an option label is empty")
        elif opts is not None:
            check.problems.append(f"{key}: options given, the field has none")
        if entry.get("src") != src.digest:
            check.stale.append(key)
    return check


def _option_text(lang: str, label: str | None, value: str) -> str:
    if not label or label == value:
        return value
    return translate(lang, "settings.option", label=label, value=value)


def localize(sections: tuple[FormSection, ...], lang: str) -> tuple[FormSection, ...]:
    """The form's texts in ``lang`` (from ``i18n/<lang>.schema.json``).

    Titles, descriptions, sub-section headings and option labels are replaced
    where the catalogue has them; anything it lacks stays in English (the
    drift test keeps the shipped catalogue complete). Paths, values and
    everything the form submits are unchanged.
    """
    cat = translation_catalog(lang)
    if not cat:
        return sections

    def text(key: str, what: str) -> str | None:
        entry = cat.get(key)
        value = entry.get(what) if isinstance(entry, Mapping) else None
        return value if isinstance(value, str) and value.strip() else None

    def options(key: str) -> Mapping[str, Any]:
        entry = cat.get(key)
        opts = entry.get("options") if isinstance(entry, Mapping) else None
        return opts if isinstance(opts, Mapping) else {}

    out = []
    for sec in sections:
        fields = []
        for f in sec.fields:
            key = f.text_key
            if f.union_tag:
                labels = tuple(
                    _option_text(lang, text(f"{key}@{o}", "title"), o) for o in f.options
                )
            else:
                opts = options(key)
                labels = tuple(_option_text(lang, opts.get(o), o) for o in f.options)
            group = text(f.group_key, "title") if f.group_key else None
            tag = variant_tag(f.group_key)
            if tag is not None and group is not None:
                union = text(f.group_key.rsplit("@", 1)[0], "title")
                group = translate(lang, "settings.variant_group", union=union, variant=group)
                group = group if union else None
            fields.append(
                dataclasses.replace(
                    f,
                    title=text(key, "title") or f.title,
                    description=text(key, "description") or f.description,
                    option_labels=labels if f.options else (),
                    group=group or f.group,
                    group_description=(text(f.group_key, "description") if f.group_key else None)
                    or f.group_description,
                )
            )
        out.append(
            FormSection(
                sec.key,
                text(sec.key, "title") or sec.title,
                text(sec.key, "description") or sec.description,
                tuple(fields),
            )
        )
    return tuple(out)


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


class _InputError(ValueError):
    """A value the form cannot even turn into its type: a message key and its values."""

    def __init__(self, key: str, **values: object) -> None:
        super().__init__(key)
        self.key = key
        self.values = values


def _convert(f: FormField, text: str | None) -> Any:
    if f.kind == "bool":
        return text is not None and text not in {"", "false", "0", "off"}
    text = (text or "").strip()
    if text == "" and (f.nullable or f.kind == "json"):
        if f.nullable:
            return None
        raise _InputError("form.required")
    if f.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise _InputError("form.whole_number") from None
    if f.kind == "float":
        try:
            num = float(text)
        except ValueError:
            raise _InputError("form.number") from None
        if not math.isfinite(num):
            raise _InputError("form.finite")
        return num
    if f.kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise _InputError("form.json", msg=exc.msg, line=exc.lineno) from None
    return text


def parse_form(
    sections: tuple[FormSection, ...],
    form: Mapping[str, str],
    current: Mapping[str, Any],
    model: type[BaseModel],
    editable: set[str],
    *,
    lang: str = "en",
) -> FormResult:
    """Turn a submitted form into a validated config.

    ``current`` is the config in force (``model_dump(mode="json")``); fields
    whose section is not in ``editable`` keep their current value whatever was
    submitted. Problems are worded in ``lang``.
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
            except _InputError as exc:
                result.errors[f.path] = translate(lang, exc.key, **exc.values)
    if result.errors:
        return result
    try:
        result.model = model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            err_path, key = _owner(owners, loc)
            msg = validation_message(lang, err)
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
