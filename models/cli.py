"""Sub-commands of the models package (see edge.cli).

- ``lineinspect teach --data DIR --out PKG``: teach a model from good parts.
- ``lineinspect eval --model PKG --data DIR --json OUT [--report PNG]``.
- ``lineinspect model keygen|sign|verify|info|pack``.

Heavy imports (torch, onnxruntime, sklearn, matplotlib) stay inside the
handlers. Exit codes: 0 success, 1 refused/failed (with the reason on
stderr), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

Handler = Callable[[argparse.Namespace], int]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _guarded(fn: Handler) -> Handler:
    """Turn the expected failures (bad package, bad key, bad data) into exit 1 with a reason."""

    def run(args: argparse.Namespace) -> int:
        from models.package import PackageError
        from models.signing import KeyFileError

        try:
            return fn(args)
        except PackageError as e:
            return _fail(f"package refused: {e.code.value}: {e.message}")
        except KeyFileError as e:
            return _fail(str(e))
        except (FileExistsError, FileNotFoundError, NotADirectoryError) as e:
            return _fail(str(e))
        except ValueError as e:  # DatasetError, ImageSetError and friends
            return _fail(str(e))

    return run


def _public_keys(paths: Sequence[Path] | None) -> list[Ed25519PublicKey] | None:
    from models.signing import load_public_key

    if not paths:
        return None
    return [load_public_key(p) for p in paths]


# --------------------------------------------------------------------------- teach


def _teach_settings(pairs: Sequence[str]) -> Any:
    """``KEY=VALUE`` strings -> ``models.teach.TeachSettings`` (values parsed as JSON)."""
    import dataclasses

    from models.teach import TeachSettings

    fields = {f.name: f for f in dataclasses.fields(TeachSettings)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(
                f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}"
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        default = fields[key].default
        if default is not dataclasses.MISSING and default is not None:
            want = float if type(default) is float else type(default)
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise ValueError(f"--set {key}: expected {want.__name__}, got {raw!r}")
        values[key] = value
    try:
        return TeachSettings(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid teach settings {values}: {e}") from e


def _cmd_teach(args: argparse.Namespace) -> int:
    from models.package import load_package, pack_tar, sign_package
    from models.signing import load_private_key

    key = load_private_key(args.sign_key) if args.sign_key else None  # fail before teaching
    from models.teach import TeachError, teach

    settings = _teach_settings(args.set or [])
    out: Path = args.out
    as_tar = out.suffix == ".tar"
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not args.force:
            return _fail(f"{out} exists; pass --force to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    work = Path(tempfile.mkdtemp(prefix="lineinspect-teach-")) / "pkg" if as_tar else out
    try:
        kwargs: dict[str, Any] = {"settings": settings, "progress": sys.stderr.isatty()}
        if args.name:
            kwargs["name"] = args.name
        if args.version:
            kwargs["version"] = args.version
        try:
            pkg_dir = Path(teach(args.data, work, **kwargs))
        except TeachError as e:
            return _fail(f"teach failed: {e}")
        if key is not None:
            fp = sign_package(pkg_dir, key)
            print(f"signed with key {fp}")
        if as_tar:
            pack_tar(pkg_dir, out)
        with load_package(out) as pkg:
            m = pkg.manifest
            print(
                f"wrote {out}: {m.model_id}, graphs {', '.join(m.graphs)}, "
                f"threshold {m.threshold.image:g} ({m.threshold.rule})"
            )
    finally:
        if as_tar:
            shutil.rmtree(work.parent, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- eval


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _cmd_eval(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    result = evaluate(
        args.model,
        args.data,
        graphs,
        tuple(args.provider or ["CPUExecutionProvider"]),
        threads=args.threads,
        trusted_keys=_public_keys(args.pubkey),
        report_png=args.report,
        progress=sys.stderr.isatty(),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{result['package']['model_id']} on {result['data']['n_images']} images")
    print(
        f"{'graph':6} {'img AUROC':>9} {'px AUROC':>9} {'AUPRO':>7} {'F1':>6} "
        f"{'FRR':>6} {'escape':>6} {'ms p50':>7}"
    )
    for v, g in result["graphs"].items():
        print(
            f"{v:6} {_fmt(g['image_auroc']):>9} {_fmt(g['pixel_auroc']):>9} "
            f"{_fmt(g['pixel_aupro'], '.3f'):>7} {_fmt(g['f1'], '.3f'):>6} "
            f"{_fmt(g['false_reject_rate'], '.3f'):>6} {_fmt(g['escape_rate'], '.3f'):>6} "
            f"{_fmt(g['latency_ms_p50'], '.2f'):>7}"
        )
    if result["data"]["skipped"]:
        print(f"skipped {len(result['data']['skipped'])} unreadable image(s)", file=sys.stderr)
    print(f"wrote {args.json}" + (f" and {args.report}" if args.report else ""))
    return 0


# --------------------------------------------------------------------------- model ...


def _cmd_keygen(args: argparse.Namespace) -> int:
    from models.signing import write_keypair

    paths = write_keypair(args.out, overwrite=args.force)
    print(f"private key {paths.private_key} (mode 0600: keep it secret, back it up)")
    print(f"public key  {paths.public_key} (fingerprint {paths.fingerprint})")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from models.package import sign_package
    from models.signing import load_private_key

    fp = sign_package(args.package, load_private_key(args.key))
    print(f"signed {args.package} with key {fp}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from models.package import check_references, load_package

    keys = _public_keys(args.pubkey)
    with load_package(args.package, keys) as pkg:
        n = len(pkg.manifest.files)
        if pkg.signed_by:
            sig = f"signature valid (key {pkg.signed_by})"
        elif pkg.has_signature:
            sig = "signature present but NOT checked (no --pubkey)"
        else:
            sig = "unsigned"
        if args.references:
            for v in pkg.graph_variants:
                results = check_references(pkg, v)
                worst = max((abs(r.observed - r.expected) for r in results), default=0.0)
                print(
                    f"graph {v}: {len(results)} reference image(s) within tolerance "
                    f"(max diff {worst:.2g})"
                )
        print(f"OK {pkg.model_id}: {n} file hashes verified, {sig}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from models.package import load_package

    with load_package(args.package) as pkg:
        m = pkg.manifest
        if args.json:
            sys.stdout.write(pkg.manifest_bytes.decode("utf-8"))
            return 0
        i = m.input
        t = m.threshold
        print(f"{m.model_id}  created {m.created:%Y-%m-%d %H:%M:%S}Z  format {m.format}")
        print(
            f"input     {i.width}x{i.height} {i.color} C={i.channels} resize={i.resize} "
            f"scale={i.scale:.6g} mean={list(i.mean)} std={list(i.std)} {i.layout}"
        )
        for v, rel in m.graphs.items():
            size_mb = pkg.file_path(rel).stat().st_size / 1e6
            star = " (default)" if v == m.default_graph else ""
            print(f"graph     {v:5} {rel} {size_mb:.2f} MB{star}")
        print(
            f"threshold image {t.image:g} pixel {t.pixel:g} raw_scale {t.raw_scale:.6g} "
            f"rule {t.rule} {json.dumps(t.params, sort_keys=True)}"
        )
        if m.method:
            print(f"method    {json.dumps(m.method, sort_keys=True)}")
        if m.metrics:
            print(f"metrics   {json.dumps(m.metrics, sort_keys=True)}")
        print(f"reference {len(m.reference)} image(s), tolerance {m.reference_tolerance}")
        print(f"files     {len(m.files)}, signature {'present' if pkg.has_signature else 'none'}")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from models.package import pack_tar

    pack_tar(args.package, args.out)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- registration


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``teach``, ``eval`` and ``model keygen|sign|verify|info|pack``."""
    p = sub.add_parser(
        "teach",
        help="teach a model package from good images",
        description="Teach an anomaly model from good parts and write a model package "
        "(a folder, or a .tar when --out ends with .tar).",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="good images: an MVTec category folder (train/good) or a flat folder",
    )
    p.add_argument("--out", type=Path, required=True, help="package folder or .tar to write")
    p.add_argument("--name", help="package name (default: the data folder's name)")
    p.add_argument("--version", help="semantic version (default 0.1.0)")
    p.add_argument("--sign-key", type=Path, help="Ed25519 private key PEM to sign with")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a teach setting (repeatable), e.g. --set input_size=224 "
        "--set backbone=efficientnet-lite1 --set fp16=false; see docs/model-method.md",
    )
    p.set_defaults(func=_guarded(_cmd_teach))

    p = sub.add_parser(
        "eval",
        help="evaluate a model package on a labelled MVTec-layout folder",
        description="Score every test image with each graph of the package (ONNX Runtime) "
        "and write metrics as JSON (and optionally a PNG report).",
    )
    p.add_argument("--model", type=Path, required=True, help="package folder or .tar")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="MVTec-layout folder (with test/ and ground_truth/)",
    )
    p.add_argument("--json", type=Path, required=True, help="where to write the metrics JSON")
    p.add_argument("--report", type=Path, help="where to write the PNG report")
    p.add_argument(
        "--graphs",
        default="fp32,int8",
        help="comma-separated graph variants to run (default fp32,int8)",
    )
    p.add_argument(
        "--provider",
        action="append",
        help="ONNX Runtime execution provider (repeatable; default CPU)",
    )
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument(
        "--pubkey",
        type=Path,
        action="append",
        help="trusted public key PEM: also require a valid signature (repeatable)",
    )
    p.set_defaults(func=_guarded(_cmd_eval))

    model = sub.add_parser("model", help="model package tools: keygen, sign, verify, info, pack")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    p = msub.add_parser("keygen", help="create an Ed25519 signing key pair")
    p.add_argument("--out", type=Path, required=True, help="folder for the two PEM files")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=_guarded(_cmd_keygen))

    p = msub.add_parser("sign", help="sign a package folder or .tar in place")
    p.add_argument("package", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key PEM")
    p.set_defaults(func=_guarded(_cmd_sign))

    p = msub.add_parser(
        "verify",
        help="verify hashes (and the signature with --pubkey); exit 1 with the reason if refused",
    )
    p.add_argument("package", type=Path)
    p.add_argument(
        "--pubkey",
        type=Path,
        action="append",
        help="trusted public key PEM (repeatable); without it hashes only",
    )
    p.add_argument(
        "--references",
        action="store_true",
        help="also score the reference images with every graph (ONNX Runtime)",
    )
    p.set_defaults(func=_guarded(_cmd_verify))

    p = msub.add_parser("info", help="show a package's manifest")
    p.add_argument("package", type=Path)
    p.add_argument("--json", action="store_true", help="print manifest.json as is")
    p.set_defaults(func=_guarded(_cmd_info))

    p = msub.add_parser("pack", help="write a package folder as a .tar archive")
    p.add_argument("package", type=Path, help="package folder")
    p.add_argument("--out", type=Path, required=True, help="the .tar to write")
    p.set_defaults(func=_guarded(_cmd_pack))
