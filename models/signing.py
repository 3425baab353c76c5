"""Ed25519 keys and detached signatures over a package's ``manifest.json``.

The signature (``manifest.sig``) is the raw 64-byte Ed25519 signature over
the manifest's exact bytes. Since the manifest lists the sha256 of every
other file, signing the manifest signs the whole package.

Keys are PEM files: the private key unencrypted PKCS#8 (file mode 0600), the
public key SubjectPublicKeyInfo. No torch, no onnxruntime: the device agent
uses this module.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNATURE_LENGTH = 64
"""Bytes in a raw Ed25519 signature."""

PRIVATE_KEY_NAME = "lineinspect-signing.key"
PUBLIC_KEY_NAME = "lineinspect-signing.pub"


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key."""


@dataclass(frozen=True, slots=True)
class KeyPairPaths:
    """Where :func:`write_keypair` put the two PEM files."""

    private_key: Path
    public_key: Path
    fingerprint: str


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: first 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_keypair(out_dir: Path, *, overwrite: bool = False) -> KeyPairPaths:
    """Generate an Ed25519 key pair and write it as two PEM files in ``out_dir``.

    The private key file is created with mode 0600. Existing files are never
    replaced unless ``overwrite`` is true (a lost signing key cannot be
    recovered, so silently replacing one is refused).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path = out_dir / PRIVATE_KEY_NAME
    pub_path = out_dir / PUBLIC_KEY_NAME
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists; refusing to replace a signing key")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if overwrite:
        priv_path.unlink(missing_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    os.chmod(priv_path, 0o600)  # in case the umask or an old file interfered
    pub_path.write_bytes(pub_pem)
    return KeyPairPaths(priv_path, pub_path, key_fingerprint(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key PEM file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read private key {path}: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key PEM file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read public key {path}: {e.strerror or e}") from e
    return parse_public_key(data, source=str(path))


def parse_public_key(pem: bytes, *, source: str = "<pem>") -> Ed25519PublicKey:
    """Parse an Ed25519 public key from PEM bytes (as kept in a config or a message)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{source} is not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The raw 64-byte Ed25519 signature of ``data``."""
    return key.sign(data)


def verify_bytes(
    data: bytes, signature: bytes, trusted_keys: Sequence[Ed25519PublicKey]
) -> Ed25519PublicKey | None:
    """The first trusted key under which ``signature`` is valid for ``data``, or None."""
    if len(signature) != SIGNATURE_LENGTH:
        return None
    for key in trusted_keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return key
    return None
