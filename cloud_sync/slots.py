"""Model slots: the active, staged and previous model packages, crash-safe.

Layout under the slots folder::

    pointer.json                 which slot is active / staged / previous (+ health watch)
    packages/<slot>/package.tar  one complete, verified package per slot
    incoming/                    downloads in progress (see cloud_sync.updates)

A slot folder is written under a temporary name, fsynced, then renamed into
place, so a slot named in the pointer is always complete. The pointer is
replaced atomically (write, fsync, rename, fsync the folder). A kill or a
power cut at any moment therefore leaves either the old or the new pointer,
both naming complete packages: the station always starts on a consistent,
working model.

The appliance calls :func:`install_config_package` (when ``model.package``
is set) and :func:`active_package_path` at start-up; the web panel's Models
page uses :class:`SlotStore` (``describe``, ``install``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

POINTER_NAME = "pointer.json"
PACKAGE_FILE = "package.tar"
_SLOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


class SlotError(Exception):
    """A slot operation that cannot be done (the message says why)."""


class HealthWatch(BaseModel):
    """Persisted health watch of a freshly activated model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    release_id: str
    started_unix: float
    until_unix: float
    baseline_error_rate: float | None = None
    baseline_p95_ms: float | None = None


class SlotPointer(BaseModel):
    """Content of ``pointer.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = 1
    active: str | None = None
    staged: str | None = None
    previous: str | None = None
    rejected: str | None = Field(None, description="Last slot rolled back from (kept to inspect).")
    watch: HealthWatch | None = None
    names: dict[str, str] = Field(
        default_factory=dict, description="Slot name -> package (model) name."
    )
    versions: dict[str, str] = Field(
        default_factory=dict, description="Slot name -> package version."
    )
    updated_unix: float = 0.0

    def version_of(self, slot: str | None) -> str | None:
        return None if slot is None else self.versions.get(slot)

    def name_of(self, slot: str | None) -> str | None:
        return None if slot is None else self.names.get(slot)


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """One slot for display (web panel Models page, `fleet status`)."""

    name: str
    role: str
    """active | staged | previous | rejected | unused"""
    path: Path
    size_bytes: int


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def slot_name_for(name: str, version: str, sha256: str) -> str:
    """The slot name of a package: ``name-version-sha8`` (filesystem-safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{name}-{version}")
    return f"{safe}-{sha256[:8]}"


class SlotStore:
    """The slots folder. Methods are not thread-safe: one owner (the agent) writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.packages = root / "packages"
        self.incoming = root / "incoming"
        for d in (self.root, self.packages, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_temporaries()

    def _clean_temporaries(self) -> None:
        """Remove half-written slots and pointer temporaries left by a kill."""
        for p in self.packages.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(f".{POINTER_NAME}.tmp*"):
            p.unlink(missing_ok=True)

    # -- pointer -------------------------------------------------------------------------------

    def read(self) -> SlotPointer:
        path = self.root / POINTER_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return SlotPointer()
        try:
            return SlotPointer.model_validate(json.loads(data))
        except (ValueError, TypeError) as exc:
            raise SlotError(f"{path} is corrupt: {exc}") from None

    def _write(self, pointer: SlotPointer) -> SlotPointer:
        for role in ("active", "staged", "previous"):
            name = getattr(pointer, role)
            if name is not None and not self.package_path(name).is_file():
                raise SlotError(f"{role} slot {name!r} has no package")
        new = pointer.model_copy(update={"updated_unix": time.time()})
        atomic_write_bytes(self.root / POINTER_NAME, new.model_dump_json(indent=1).encode())
        return new

    def package_path(self, slot: str) -> Path:
        if not _SLOT_RE.match(slot):
            raise SlotError(f"bad slot name {slot!r}")
        return self.packages / slot / PACKAGE_FILE

    def active_package(self) -> Path | None:
        """The active package's path, or None before the first install."""
        ptr = self.read()
        return None if ptr.active is None else self.package_path(ptr.active)

    # -- packages ------------------------------------------------------------------------------

    def add_package(self, src: Path, slot: str, *, move: bool = False) -> Path:
        """Copy (or move) a package tar into slot ``slot`` atomically; returns its path.

        An existing complete slot of the same name is kept (same name means
        same sha256).
        """
        dest = self.package_path(slot)
        if dest.is_file():
            if move:
                src.unlink(missing_ok=True)
            return dest
        tmp_dir = self.packages / f".tmp-{slot}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        tmp_file = tmp_dir / PACKAGE_FILE
        if move:
            os.replace(src, tmp_file)
        else:
            shutil.copyfile(src, tmp_file)
        with open(tmp_file, "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(tmp_dir)
        os.replace(tmp_dir, dest.parent)
        fsync_dir(self.packages)
        return dest

    def stage(self, slot: str, version: str, name: str = "") -> SlotPointer:
        """Mark a complete slot as staged (awaiting validation and activation)."""
        ptr = self.read()
        names = {**ptr.names, slot: name} if name else ptr.names
        return self._write(
            ptr.model_copy(
                update={"staged": slot, "versions": {**ptr.versions, slot: version}, "names": names}
            )
        )

    def clear_staged(self) -> SlotPointer:
        ptr = self.read()
        return self._write(ptr.model_copy(update={"staged": None}))

    def activate_staged(self, watch: HealthWatch | None = None) -> SlotPointer:
        """One atomic pointer change: staged becomes active, active becomes previous."""
        ptr = self.read()
        if ptr.staged is None:
            raise SlotError("no staged slot to activate")
        if ptr.staged == ptr.active:
            return self._write(ptr.model_copy(update={"staged": None, "watch": watch}))
        return self._write(
            ptr.model_copy(
                update={
                    "active": ptr.staged,
                    "previous": ptr.active,
                    "staged": None,
                    "watch": watch,
                }
            )
        )

    def install(self, src: Path, slot: str, version: str, name: str = "") -> SlotPointer:
        """Install a package and make it active at once (first install, manual upload)."""
        self.add_package(src, slot)
        ptr = self.read()
        if ptr.active == slot:
            return ptr
        return self._write(
            ptr.model_copy(
                update={
                    "active": slot,
                    "previous": ptr.active,
                    "watch": None,
                    "versions": {**ptr.versions, slot: version},
                    "names": {**ptr.names, slot: name} if name else ptr.names,
                }
            )
        )

    def end_watch(self) -> SlotPointer:
        ptr = self.read()
        return self._write(ptr.model_copy(update={"watch": None}))

    def rollback(self) -> SlotPointer:
        """Make the previous slot active again; the rolled-back slot becomes ``rejected``."""
        ptr = self.read()
        if ptr.previous is None:
            raise SlotError("no previous slot to roll back to")
        return self._write(
            ptr.model_copy(
                update={
                    "active": ptr.previous,
                    "previous": None,
                    "rejected": ptr.active,
                    "watch": None,
                }
            )
        )

    def gc(self) -> list[str]:
        """Delete slot folders the pointer no longer names; returns their names."""
        ptr = self.read()
        keep = {ptr.active, ptr.staged, ptr.previous, ptr.rejected}
        gone: list[str] = []
        for d in self.packages.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        if gone:
            versions = {k: v for k, v in ptr.versions.items() if k in keep}
            names = {k: v for k, v in ptr.names.items() if k in keep}
            self._write(ptr.model_copy(update={"versions": versions, "names": names}))
        return gone

    def describe(self) -> list[SlotInfo]:
        """Every slot folder with its role (for the panel and the CLI)."""
        ptr = self.read()
        roles = {
            ptr.active: "active",
            ptr.staged: "staged",
            ptr.previous: "previous",
            ptr.rejected: "rejected",
        }
        out: list[SlotInfo] = []
        for d in sorted(self.packages.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            pkg = d / PACKAGE_FILE
            size = pkg.stat().st_size if pkg.is_file() else 0
            out.append(SlotInfo(d.name, roles.get(d.name, "unused"), pkg, size))
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.read().model_dump()


def active_package_path(slots_dir: Path) -> Path | None:
    """The active model package under ``slots_dir`` (None before the first install).

    Read-only: safe to call from the appliance at start-up while the agent runs.
    """
    path = slots_dir / POINTER_NAME
    try:
        ptr = SlotPointer.model_validate(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    if ptr.active is None:
        return None
    pkg = slots_dir / "packages" / ptr.active / PACKAGE_FILE
    return pkg if pkg.is_file() else None


CONFIG_MARKER = "config-package.json"


def install_config_package(
    slots_dir: Path, package: Path, trusted_keys: list[Any] | None = None
) -> tuple[Path, bool]:
    """Make the configuration's ``model.package`` a slot; return (package to run, installed).

    ``model.package`` is the station's *initial* model, not a pin: the first
    start copies it into a slot and makes it active, so the fleet or the panel
    can later activate another model with this one as ``previous`` (to roll
    back to), and an activation survives a restart. The copy is installed
    again only when the configuration names a different package than the one
    installed last (``config-package.json`` remembers it): then it becomes
    active and the model it replaces becomes ``previous``.

    Raises ``models.package.PackageError`` when the package is refused and
    :class:`SlotError` when the slots folder is unusable.
    """
    import hashlib
    import tempfile

    from models.package import load_package, pack_tar

    store = SlotStore(slots_dir)
    marker = slots_dir / CONFIG_MARKER
    with load_package(Path(package), trusted_keys) as pkg:
        m = pkg.manifest
        digest = hashlib.sha256(pkg.manifest_bytes).hexdigest()
        slot = slot_name_for(m.name, m.version, digest)
        try:
            last = json.loads(marker.read_text()).get("slot")
        except (FileNotFoundError, ValueError, AttributeError):
            last = None
        ptr = store.read()
        active = ptr.active is not None and store.package_path(ptr.active).is_file()
        if last == slot and active:
            assert ptr.active is not None
            return store.package_path(ptr.active), False
        with tempfile.TemporaryDirectory(dir=store.incoming) as tmp:
            tar = pack_tar(pkg.root, Path(tmp) / PACKAGE_FILE)
            store.install(tar, slot, m.version, m.name)
    info = {"slot": slot, "package": str(package), "installed_unix": time.time()}
    atomic_write_bytes(marker, json.dumps(info, indent=1).encode())
    return store.package_path(slot), True
