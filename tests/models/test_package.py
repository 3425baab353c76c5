"""Model package: write, load, tar, hashes, signatures, unsafe archives, preprocessing.

Packages here are real (ONNX graphs checked by onnx, scored by ONNX Runtime),
built by models.toy_package so no taught model is needed.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as ec_mod
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from models import signing
from models.package import (
    InputSpec,
    Limits,
    Manifest,
    PackageError,
    PackageErrorCode,
    ThresholdSpec,
    check_references,
    load_package,
    pack_tar,
    preprocess_batch,
    preprocess_image,
    refresh_package,
    semver_key,
    sign_package,
    write_package,
)
from models.toy_package import build_toy_package

Code = PackageErrorCode


@pytest.fixture
def pkg_dir(tmp_path: Path) -> Path:
    return build_toy_package(tmp_path / "pkg")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def refused(code: PackageErrorCode, path: Path, **kw: object) -> PackageError:
    with pytest.raises(PackageError) as ei:
        load_package(path, **kw)  # type: ignore[arg-type]
    assert ei.value.code is code, str(ei.value)
    assert ei.value.message
    return ei.value


def edit_manifest(pkg: Path, fn: object) -> None:
    raw = json.loads((pkg / "manifest.json").read_text())
    fn(raw)  # type: ignore[operator]
    (pkg / "manifest.json").write_text(json.dumps(raw))


# ------------------------------------------------------------------ round trips


def test_folder_round_trip(pkg_dir: Path) -> None:
    pkg = load_package(pkg_dir)
    m = pkg.manifest
    assert m.model_id == "toy-brightness@1.0.0"
    assert pkg.graph_variants == ("fp32", "int8")
    assert pkg.graph_path() == pkg_dir / "model_int8.onnx"
    assert pkg.graph_path("fp32").is_file()
    assert set(m.files) == {
        "model_fp32.onnx",
        "model_int8.onnx",
        "reference/ref_000.png",
        "reference/ref_001.png",
    }
    assert not pkg.has_signature
    assert pkg.signed_by is None
    # the manifest re-serialises to exactly the bytes on disk
    assert m.to_bytes() == (pkg_dir / "manifest.json").read_bytes()
    assert Manifest.model_validate_json(pkg.manifest_bytes) == m
    results = check_references(pkg, "fp32")
    assert len(results) == 2
    assert all(r.ok for r in results)
    labels = {r.file: r.observed for r in results}
    assert labels["reference/ref_001.png"] > 1.0 > labels["reference/ref_000.png"]
    x = pkg.preprocess(np.zeros((10, 20, 3), np.uint8))
    assert x.shape == (1, 1, 64, 64)
    assert x.dtype == np.float32


def test_manifest_bytes_and_tar_are_deterministic(tmp_path: Path) -> None:
    a = build_toy_package(tmp_path / "a")
    b = build_toy_package(tmp_path / "b")
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    pack_tar(a, tmp_path / "a.tar")
    pack_tar(b, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_tar_round_trip_and_cleanup(pkg_dir: Path, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    sign_package(pkg_dir, key)
    tar_path = pack_tar(pkg_dir, tmp_path / "out" / "toy.tar")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert "reference/ref_000.png" in names
    with load_package(tar_path, [key.public_key()]) as pkg:
        root = pkg.root
        assert root != pkg_dir
        assert pkg.signed_by == signing.key_fingerprint(key.public_key())
        assert pkg.source == tar_path
        assert all(r.ok for r in check_references(pkg))
        assert root.is_dir()
    assert not root.exists()


def test_tar_into_given_extract_dir(pkg_dir: Path, tmp_path: Path) -> None:
    tar_path = pack_tar(pkg_dir, tmp_path / "toy.tar")
    dest = tmp_path / "staged"
    pkg = load_package(tar_path, extract_dir=dest)
    assert pkg.root == dest
    pkg.close()
    assert (dest / "model_fp32.onnx").is_file()  # a caller-owned folder is kept
    with pytest.raises(ValueError, match="not empty"):
        load_package(tar_path, extract_dir=dest)


def test_pack_refuses_broken_folder_and_self_nesting(pkg_dir: Path, tmp_path: Path) -> None:
    (pkg_dir / "stray.txt").write_text("x")
    with pytest.raises(PackageError) as ei:
        pack_tar(pkg_dir, tmp_path / "x.tar")
    assert ei.value.code is Code.FILE_UNLISTED
    assert not (tmp_path / "x.tar").exists()
    with pytest.raises(ValueError, match="inside"):
        pack_tar(pkg_dir, pkg_dir / "self.tar")


# ------------------------------------------------------------------ hashes and files


def test_tampered_graph_byte(pkg_dir: Path, tmp_path: Path) -> None:
    tar_path = pack_tar(pkg_dir, tmp_path / "ok.tar")
    graph = pkg_dir / "model_int8.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    err = refused(Code.HASH_MISMATCH, pkg_dir)
    assert "model_int8.onnx" in err.message
    # the same tamper inside an archive
    raw = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("model_fp32.onnx")
    raw[member.offset_data + 10] ^= 0xFF
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(bytes(raw))
    assert "model_fp32.onnx" in refused(Code.HASH_MISMATCH, bad_tar).message


def test_unlisted_extra_file(pkg_dir: Path) -> None:
    (pkg_dir / "reference" / "extra.png").write_bytes(b"\x89PNG")
    assert "reference/extra.png" in refused(Code.FILE_UNLISTED, pkg_dir).message


def test_missing_file(pkg_dir: Path) -> None:
    (pkg_dir / "reference" / "ref_001.png").unlink()
    assert "reference/ref_001.png" in refused(Code.FILE_MISSING, pkg_dir).message


def test_missing_manifest_and_path(pkg_dir: Path, tmp_path: Path) -> None:
    refused(Code.NOT_FOUND, tmp_path / "nope")
    (pkg_dir / "manifest.json").unlink()
    refused(Code.MANIFEST_MISSING, pkg_dir)


def test_symlink_in_folder(pkg_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    os.symlink(secret, pkg_dir / "link.txt")
    refused(Code.UNSAFE_PATH, pkg_dir)


def test_manifest_symlink_refused_but_linked_package_folder_ok(
    pkg_dir: Path, tmp_path: Path
) -> None:
    current = tmp_path / "current"
    current.symlink_to(pkg_dir, target_is_directory=True)  # how slots point at a package
    assert load_package(current).manifest.name == "toy-brightness"
    real = tmp_path / "elsewhere.json"
    (pkg_dir / "manifest.json").rename(real)
    (pkg_dir / "manifest.json").symlink_to(real)
    refused(Code.UNSAFE_PATH, pkg_dir)


def test_limits(pkg_dir: Path, tmp_path: Path) -> None:
    refused(Code.TOO_LARGE, pkg_dir, limits=Limits(max_files=3))
    refused(Code.TOO_LARGE, pkg_dir, limits=Limits(max_file_bytes=100))
    tar_path = pack_tar(pkg_dir, tmp_path / "t.tar")
    refused(Code.TOO_LARGE, tar_path, limits=Limits(max_total_bytes=1000))
    refused(Code.TOO_LARGE, tar_path, limits=Limits(max_manifest_bytes=100))


# ------------------------------------------------------------------ manifest content


def test_bad_semver_refused_on_write_and_load(pkg_dir: Path, tmp_path: Path) -> None:
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-", ""):
        with pytest.raises(PackageError) as ei:
            build_toy_package(tmp_path / f"w{bad}", version=bad)
        assert ei.value.code is Code.MANIFEST_INVALID
        assert "version" in ei.value.message
    edit_manifest(pkg_dir, lambda m: m.update(version="1.2"))
    assert "version" in refused(Code.MANIFEST_INVALID, pkg_dir).message


def test_unknown_format(pkg_dir: Path) -> None:
    edit_manifest(pkg_dir, lambda m: m.update(format="lineinspect-model/2"))
    assert "lineinspect-model/2" in refused(Code.UNKNOWN_FORMAT, pkg_dir).message
    edit_manifest(pkg_dir, lambda m: m.pop("format"))
    refused(Code.UNKNOWN_FORMAT, pkg_dir)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(default_graph="fp16"), "default_graph"),
        (lambda m: m.update(extra_field=1), "extra_field"),
        (lambda m: m["graphs"].update(fp16="model_fp16.onnx"), "model_fp16.onnx"),
        (lambda m: m["files"].update({"../evil": "0" * 64}), "unsafe"),
        (lambda m: m["input"].update(mean=[0.1, 0.2]), "mean"),
        (lambda m: m["input"].update(color="rgb"), "channels"),
        (lambda m: m["threshold"].update(raw_scale=0), "raw_scale"),
        (lambda m: m.update(name="has space"), "name"),
        (lambda m: m.update(created="yesterday"), "created"),
        (lambda m: m.pop("threshold"), "threshold"),
        (lambda m: m["reference"][0]["scores"].update(fp64=1.0), "fp64"),
    ],
)
def test_invalid_manifest_fields(pkg_dir: Path, edit: object, needle: str) -> None:
    edit_manifest(pkg_dir, edit)
    assert needle in refused(Code.MANIFEST_INVALID, pkg_dir).message


def test_manifest_not_json(pkg_dir: Path) -> None:
    (pkg_dir / "manifest.json").write_bytes(b"{not json")
    refused(Code.MANIFEST_INVALID, pkg_dir)
    (pkg_dir / "manifest.json").write_bytes(b"[1, 2]")
    refused(Code.MANIFEST_INVALID, pkg_dir)


def test_nan_metric_written_as_null(tmp_path: Path) -> None:
    pkg_dir = build_toy_package(tmp_path / "p", metrics={"image_auroc": float("nan"), "f1": 0.5})
    raw = json.loads((pkg_dir / "manifest.json").read_bytes())
    assert raw["metrics"] == {"image_auroc": None, "f1": 0.5}
    assert load_package(pkg_dir).manifest.metrics["image_auroc"] is None


def test_write_package_rejects_unsafe_file_names(tmp_path: Path) -> None:
    with pytest.raises(PackageError) as ei:
        write_package(
            tmp_path / "p",
            name="x",
            version="1.0.0",
            input_spec=InputSpec(width=8, height=8),
            graphs={"fp32": "g.onnx"},
            threshold=ThresholdSpec(raw_scale=1.0, rule="fixed"),
            files={"../g.onnx": b"x"},
        )
    assert ei.value.code is Code.UNSAFE_PATH
    assert not (tmp_path / "g.onnx").exists()


def test_unknown_graph_variant(pkg_dir: Path) -> None:
    pkg = load_package(pkg_dir)
    with pytest.raises(PackageError) as ei:
        pkg.graph_path("fp16")
    assert ei.value.code is Code.UNKNOWN_GRAPH


def test_refresh_updates_metrics_and_drops_stale_signature(
    pkg_dir: Path, key: Ed25519PrivateKey
) -> None:
    sign_package(pkg_dir, key)
    (pkg_dir / "report.png").write_bytes(
        cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    )
    m = refresh_package(pkg_dir, {"metrics": {"image_auroc": 0.99}})
    assert m.metrics == {"image_auroc": 0.99}
    assert "report.png" in m.files
    assert not (pkg_dir / "manifest.sig").exists()
    refused(Code.SIGNATURE_MISSING, pkg_dir, trusted_keys=[key.public_key()])
    refresh_package(pkg_dir, sign_key=key)
    assert load_package(pkg_dir, [key.public_key()]).manifest.metrics["image_auroc"] == 0.99


def test_reference_mismatch_detected(pkg_dir: Path) -> None:
    raw = json.loads((pkg_dir / "manifest.json").read_text())
    raw["reference"][1]["scores"]["int8"] = 0.2
    refresh_package(pkg_dir, {"reference": raw["reference"]})
    pkg = load_package(pkg_dir)
    assert all(r.ok for r in check_references(pkg, "fp32"))
    with pytest.raises(PackageError) as ei:
        check_references(pkg, "int8")
    assert ei.value.code is Code.REFERENCE_MISMATCH
    assert "ref_001.png" in ei.value.message
    results = check_references(pkg, "int8", raise_on_mismatch=False)
    assert [r.ok for r in results] == [True, False]


# ------------------------------------------------------------------ signatures


def test_signature_verified_with_trusted_keys(pkg_dir: Path, key: Ed25519PrivateKey) -> None:
    fp = sign_package(pkg_dir, key)
    other = Ed25519PrivateKey.generate().public_key()
    pkg = load_package(pkg_dir, [other, key.public_key()])
    assert pkg.signed_by == fp
    assert pkg.has_signature
    # without keys the signature is present but unchecked
    pkg = load_package(pkg_dir)
    assert pkg.has_signature
    assert pkg.signed_by is None


def test_tampered_manifest_with_old_signature(pkg_dir: Path, key: Ed25519PrivateKey) -> None:
    sign_package(pkg_dir, key)
    sig = (pkg_dir / "manifest.sig").read_bytes()
    # lower the threshold, keep hashes consistent, keep the old signature
    refresh_package(pkg_dir, {"threshold": {"image": 5.0, "raw_scale": 0.5, "rule": "fixed"}})
    (pkg_dir / "manifest.sig").write_bytes(sig)
    refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[key.public_key()])
    # a one-byte change of the manifest is enough
    sign_package(pkg_dir, key)
    data = (pkg_dir / "manifest.json").read_bytes()
    (pkg_dir / "manifest.json").write_bytes(data.replace(b'"image": 5.0', b'"image": 6.0'))
    refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[key.public_key()])


def test_missing_signature_with_trusted_keys(pkg_dir: Path, key: Ed25519PrivateKey) -> None:
    err = refused(Code.SIGNATURE_MISSING, pkg_dir, trusted_keys=[key.public_key()])
    assert "manifest.sig" in err.message


def test_wrong_key_and_empty_key_list(pkg_dir: Path, key: Ed25519PrivateKey) -> None:
    sign_package(pkg_dir, key)
    other = Ed25519PrivateKey.generate().public_key()
    err = refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[other])
    assert signing.key_fingerprint(other) in err.message
    refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[])


def test_malformed_signature_file(pkg_dir: Path, key: Ed25519PrivateKey) -> None:
    sign_package(pkg_dir, key)
    sig = (pkg_dir / "manifest.sig").read_bytes()
    (pkg_dir / "manifest.sig").write_bytes(sig[:40])
    refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[key.public_key()])
    (pkg_dir / "manifest.sig").write_bytes(bytes(64))
    refused(Code.SIGNATURE_INVALID, pkg_dir, trusted_keys=[key.public_key()])


def test_sign_tar_in_place(pkg_dir: Path, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    tar_path = pack_tar(pkg_dir, tmp_path / "p.tar")
    refused(Code.SIGNATURE_MISSING, tar_path, trusted_keys=[key.public_key()])
    sign_package(tar_path, key)
    with load_package(tar_path, [key.public_key()]) as pkg:
        assert pkg.signed_by is not None


def test_keypair_files(tmp_path: Path) -> None:
    paths = signing.write_keypair(tmp_path / "keys")
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    priv = signing.load_private_key(paths.private_key)
    pub = signing.load_public_key(paths.public_key)
    assert signing.key_fingerprint(pub) == paths.fingerprint
    sig = signing.sign_bytes(b"abc", priv)
    assert signing.verify_bytes(b"abc", sig, [pub]) is pub
    assert signing.verify_bytes(b"abd", sig, [pub]) is None
    with pytest.raises(FileExistsError):
        signing.write_keypair(tmp_path / "keys")
    with pytest.raises(signing.KeyFileError, match="not an unencrypted PEM private key"):
        # a public key where a private one is expected, and vice versa
        signing.load_private_key(paths.public_key)
    ec = ec_mod.generate_private_key(ec_mod.SECP256R1())
    ec_pem = tmp_path / "ec.key"
    ec_pem.write_bytes(
        ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(signing.KeyFileError, match="not an Ed25519 private key"):
        signing.load_private_key(ec_pem)
    with pytest.raises(signing.KeyFileError):
        signing.load_public_key(paths.private_key)
    with pytest.raises(signing.KeyFileError, match="cannot read"):
        signing.load_public_key(tmp_path / "missing.pub")


# ------------------------------------------------------------------ unsafe archives


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _package_members(pkg_dir: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for p in sorted(pkg_dir.rglob("*")):
        if p.is_file():
            out.append((tarfile.TarInfo(p.relative_to(pkg_dir).as_posix()), p.read_bytes()))
    return out


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/abs_escape.txt", "reference/../../x.txt"])
def test_path_traversal_member(pkg_dir: Path, tmp_path: Path, name: str) -> None:
    evil = _tar_with(
        tmp_path / "evil.tar", [*_package_members(pkg_dir), (tarfile.TarInfo(name), b"pwn")]
    )
    dest = tmp_path / "x" / "dest"
    refused(Code.UNSAFE_ARCHIVE, evil, extract_dir=dest)
    assert not (tmp_path / "x" / "escape.txt").exists()
    assert not Path("/tmp/abs_escape.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_link_or_special_member(pkg_dir: Path, tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("reference/link.png")
    info.type = kind
    info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "model_fp32.onnx"
    evil = _tar_with(tmp_path / "evil.tar", [*_package_members(pkg_dir), (info, None)])
    refused(Code.UNSAFE_ARCHIVE, evil)


def test_duplicate_member(pkg_dir: Path, tmp_path: Path) -> None:
    members = _package_members(pkg_dir)
    evil = _tar_with(tmp_path / "dup.tar", [*members, members[-1]])
    refused(Code.UNSAFE_ARCHIVE, evil)


def test_corrupt_and_truncated_tar(pkg_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    refused(Code.BAD_ARCHIVE, junk)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    refused(Code.BAD_ARCHIVE, empty)
    good = pack_tar(pkg_dir, tmp_path / "good.tar")
    with tarfile.open(good) as tar:
        member = tar.getmember("model_fp32.onnx")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: member.offset_data + member.size // 2])
    err = refused(Code.BAD_ARCHIVE, cut)
    assert "truncated" in err.message or "unexpected end" in err.message


# ------------------------------------------------------------------ preprocessing


def test_preprocess_rgb_exact() -> None:
    spec = InputSpec(
        width=4,
        height=2,
        color="rgb",
        channels=3,
        scale=1 / 255,
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.25, 2.0),
    )
    bgr = np.zeros((2, 4, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # B, G, R
    x = preprocess_image(bgr, spec)
    assert x.shape == (3, 2, 4)
    assert x.dtype == np.float32
    expected = [(30 / 255 - 0.1) / 0.5, (20 / 255 - 0.2) / 0.25, (10 / 255 - 0.3) / 2.0]
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)
    # bgr keeps the order
    xb = preprocess_image(bgr, spec.model_copy(update={"color": "bgr"}))
    np.testing.assert_allclose(xb[0, 0, 0], (10 / 255 - 0.1) / 0.5, rtol=1e-6)
    # BGRA and a gray input give consistent results
    bgra = np.dstack([bgr, np.full((2, 4), 255, np.uint8)])
    np.testing.assert_array_equal(preprocess_image(bgra, spec), x)
    gray = np.full((2, 4), 50, np.uint8)
    xg = preprocess_image(gray, spec)
    np.testing.assert_allclose(
        xg[:, 1, 3],
        [(50 / 255 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)],
        atol=1e-6,
    )


def test_preprocess_rgb_source_matches_bgr_source() -> None:
    """Arrays already in RGB order give the same tensor when declared as such."""
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    for color in ("rgb", "bgr", "gray"):
        channels = 1 if color == "gray" else 3
        spec = InputSpec(
            width=16,
            height=12,
            color=color,
            channels=channels,
            mean=(0.4,) * channels,
            std=(0.2,) * channels,
        )
        want = preprocess_batch([bgr], spec)
        np.testing.assert_array_equal(preprocess_batch([rgb], spec, source="rgb"), want)
        rgba = np.dstack([rgb, np.zeros((30, 20), np.uint8)])
        np.testing.assert_array_equal(preprocess_image(rgba, spec, source="rgb"), want[0])
    # gray input is the same whatever the source says
    gray = bgr[:, :, 0]
    np.testing.assert_array_equal(
        preprocess_image(gray, spec, source="rgb"), preprocess_image(gray, spec)
    )
    with pytest.raises(ValueError, match="source"):
        preprocess_image(bgr, spec, source="yuv")  # type: ignore[arg-type]


def test_preprocess_gray_spec_and_resize() -> None:
    spec = InputSpec(width=8, height=6, color="gray", channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    bgr = np.zeros((60, 80, 3), np.uint8)
    bgr[:, :, 1] = 255  # pure green
    x = preprocess_image(bgr, spec)
    assert x.shape == (3, 6, 8)
    gray_level = cv2.cvtColor(np.full((1, 1, 3), (0, 255, 0), np.uint8), cv2.COLOR_BGR2GRAY)[0, 0]
    np.testing.assert_allclose(x, (gray_level / 255 - 0.5) / 0.5, rtol=1e-6)
    one = InputSpec(width=8, height=6, color="gray", channels=1, mean=(0,), std=(1,))
    assert preprocess_image(bgr, one).shape == (1, 6, 8)
    assert preprocess_image(bgr[:, :, :1], one).shape == (1, 6, 8)
    batch = preprocess_batch([bgr, bgr[:10, :10]], one)
    assert batch.shape == (2, 1, 6, 8)
    assert preprocess_batch([], one).shape == (0, 1, 6, 8)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4), np.float32),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4,), np.uint8),
    ],
)
def test_preprocess_rejects_bad_images(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"expected|unsupported"):
        preprocess_image(image, InputSpec(width=4, height=4))


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    color=st.sampled_from(["rgb", "bgr"]),
    mean=st.tuples(*[st.floats(-1, 1)] * 3),
    std=st.tuples(*[st.floats(0.05, 4)] * 3),
    seed=st.integers(0, 2**16),
)
def test_preprocess_matches_reference_formula(
    h: int, w: int, color: str, mean: tuple[float, ...], std: tuple[float, ...], seed: int
) -> None:
    """Without resizing, the tensor is ((pixel/255 - mean)/std) in the declared channel order."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    spec = InputSpec(width=w, height=h, color=color, channels=3, mean=mean, std=std)
    x = preprocess_image(img, spec)
    src = img[..., ::-1] if color == "rgb" else img
    ref = (src.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-5)


def test_semver_precedence() -> None:
    versions = [
        "1.0.0",
        "1.0.0-rc.1",
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "0.9.12",
        "1.0.0-beta.11",
        "1.0.0-beta.2",
        "2.0.0",
        "1.10.0",
    ]
    assert sorted(versions, key=semver_key) == [
        "0.9.12",
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.10.0",
        "2.0.0",
    ]
    with pytest.raises(ValueError, match="semantic"):
        semver_key("1.0")
