"""The one place where cloud_sync touches the other packages.

- the result store (edge): :class:`VerdictSource` and :func:`stored_to_record`;
- model packages (models.package, models.signing): :func:`package_info`,
  :func:`load_trusted_keys`;
- the inference backends (edge.backends): :func:`validate_package` loads a
  staged package in the configured backend and checks the reference scores.

Everything else in cloud_sync talks to these functions only, so a change of
those packages' APIs is absorbed here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge.backends.config import BackendConfig
    from edge.runtime_config import StoreConfig
    from edge.store import ResultStore


class VerdictSource(Protocol):
    """What the outbox feeder needs from the result store."""

    def verdicts_after(self, after_id: int, limit: int) -> Sequence[Any]:
        """Stored verdicts with a row id greater than ``after_id``, oldest first."""
        ...


def _code_name(code: Any) -> str:
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(code, int):
        return {1: "OK", 2: "NG", 3: "ERROR"}.get(code, "ERROR")
    return str(code).upper()


def _finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def stored_to_record(stored: Any, include_regions: bool = True) -> tuple[int, str, dict[str, Any]]:
    """(store row id, code, record fields) of one stored verdict.

    Accepts the result store's ``edge.store.StoredVerdict`` (keyed by
    ``inspection_id``) or anything carrying the :class:`edge.types.Verdict`
    fields, optionally wrapped as ``.verdict``.
    """
    store_id = getattr(stored, "inspection_id", None)
    if store_id is None:
        store_id = getattr(stored, "id", None)
    if store_id is None:
        raise ValueError(f"stored verdict {stored!r} has no row id")
    v = getattr(stored, "verdict", stored)
    regions: list[dict[str, Any]] = []
    if include_regions:
        for r in getattr(v, "regions", ()) or ():
            d = (
                dataclasses.asdict(r)
                if dataclasses.is_dataclass(r) and not isinstance(r, type)
                else dict(r)
            )
            d["peak_score"] = _finite_or_none(d.get("peak_score")) or 0.0
            regions.append(d)
    code = _code_name(getattr(v, "code", "ERROR"))
    timings = {
        str(k): float(t)
        for k, t in (getattr(v, "timings_ms", None) or {}).items()
        if _finite_or_none(t) is not None
    }
    fields: dict[str, Any] = {
        "store_id": int(store_id),
        "inspection_id": int(getattr(v, "inspection_id", store_id)),
        "code": code,
        "score": _finite_or_none(getattr(v, "score", None)),
        "threshold": _finite_or_none(getattr(v, "threshold", None)) or 0.0,
        "trigger_id": getattr(v, "trigger_id", None),
        "source_id": str(getattr(v, "source_id", "")),
        "defect_class": str(getattr(v, "defect_class", "")),
        "regions": regions,
        "model_name": str(getattr(v, "model_name", "")),
        "model_version": str(getattr(v, "model_version", "")),
        "timings_ms": timings,
        "error": str(getattr(v, "error", "")),
        "decided_unix": float(getattr(v, "decided_unix", 0.0) or 0.0),
    }
    return int(store_id), code, fields


def open_result_store(config: StoreConfig) -> ResultStore:
    """Open the appliance's result store (WAL: safe next to the running appliance).

    The caller stops it (``store.stop()``) when done.
    """
    from edge.store import ResultStore

    store = ResultStore(config)
    store.start()
    return store


def load_trusted_keys(paths: Sequence[Path]) -> list[Ed25519PublicKey]:
    """Ed25519 public keys from PEM files (raises ``KeyFileError`` naming the bad file)."""
    from models.signing import load_public_key

    return [load_public_key(p) for p in paths]


def key_id(key: Ed25519PublicKey) -> str:
    from models.signing import key_fingerprint

    return key_fingerprint(key)


@dataclass(frozen=True, slots=True)
class PackageInfo:
    """Name and version of a verified package."""

    name: str
    version: str


def package_info(path: Path, trusted_keys: Sequence[Ed25519PublicKey] | None) -> PackageInfo:
    """Open a package (verifying hashes and, with keys, its signature); raises PackageError."""
    from models.package import load_package

    with load_package(path, trusted_keys) as pkg:
        return PackageInfo(pkg.manifest.name, pkg.manifest.version)


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """Outcome of validating a staged package."""

    ok: bool
    message: str
    graph: str = ""
    references: int = 0


def validate_package(
    path: Path,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    backend_config: BackendConfig | None = None,
) -> ValidationReport:
    """Load ``path`` in the configured backend and score its reference images.

    Passes when the package verifies (hashes, signature under ``trusted_keys``),
    the backend loads its graph, and every reference image scored by that
    graph lands within the manifest's ``reference_tolerance`` (default 0.05).
    A package without reference scores for the graph fails: nothing shows it works.
    """
    import cv2

    from edge.backends import BackendError, GraphSource, create_backend
    from edge.backends.config import OnnxRuntimeBackendConfig
    from models.package import PackageError, load_package

    cfg: Any = backend_config or OnnxRuntimeBackendConfig()
    try:
        with load_package(path, trusted_keys) as pkg:
            m = pkg.manifest
            available = {k: pkg.graph_path(k) for k in pkg.graph_variants}
            backend = create_backend(cfg)
            try:
                kind = type(backend).choose_graph(cfg, available, m.default_graph)
                spec = pkg.input_spec
                backend.load(
                    GraphSource(
                        path=available[kind],
                        kind=kind,
                        sha256=m.files[m.graphs[kind]],
                        input_shape=(spec.channels, spec.height, spec.width),
                    )
                )
                tol = m.reference_tolerance.get(kind, 0.05)
                checked = 0
                for ref, ref_path in pkg.reference_images():
                    if kind not in ref.scores:
                        continue
                    image = cv2.imread(str(ref_path), cv2.IMREAD_UNCHANGED)
                    if image is None:
                        return ValidationReport(False, f"cannot decode {ref.file}", kind, checked)
                    out = backend.run(pkg.preprocess(image))
                    got = float(out.score[0])
                    want = ref.scores[kind]
                    checked += 1
                    if not math.isfinite(got) or abs(got - want) > tol:
                        return ValidationReport(
                            False,
                            f"{ref.file}: score {got:.4f}, manifest expects {want:.4f} ±{tol}",
                            kind,
                            checked,
                        )
                if checked == 0:
                    return ValidationReport(
                        False, f"no reference image has a score for graph {kind!r}", kind, 0
                    )
                return ValidationReport(
                    True,
                    f"{checked} reference image(s) within ±{tol} on graph {kind!r}",
                    kind,
                    checked,
                )
            finally:
                backend.close()
    except PackageError as exc:
        return ValidationReport(False, f"package refused: {exc}")
    except BackendError as exc:
        return ValidationReport(False, f"backend: {exc}")
    except (OSError, ValueError) as exc:
        return ValidationReport(False, f"{type(exc).__name__}: {exc}")
