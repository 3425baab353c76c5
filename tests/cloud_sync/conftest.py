"""A real Mosquitto with TLS, client certificates and the shipped ACL file, per test.

The CA and every certificate are generated here with ``cryptography``; the
ACL file is the one documented in deploy/mosquitto/aclfile.
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` without `python -m` does not put the repo first
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from cloud_sync.agent import Agent  # noqa: E402
from cloud_sync.edge_link import validate_package  # noqa: E402
from cloud_sync.fleet import (  # noqa: E402
    ChunkServer,
    ReleaseStore,
    RolloutController,
    make_release,
)
from cloud_sync.slots import SlotStore, slot_name_for  # noqa: E402
from cloud_sync.topics import RolloutSettings, SignedRelease  # noqa: E402
from edge.store import ResultStore  # noqa: E402
from models.package import load_package  # noqa: E402
from models.signing import load_private_key, load_public_key, write_keypair  # noqa: E402
from tests.cloud_sync.helpers import (  # noqa: E402
    build_package,
    fleet_settings,
    make_store,
    uplink_config,
)
from tests.conftest import free_tcp_port, require_tool  # noqa: E402

ACL_FILE = REPO / "deploy" / "mosquitto" / "aclfile"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)


@dataclass
class Pki:
    """A throw-away CA that issues server and client certificates."""

    root: Path
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    ca_cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("LineInspect test CA"))
            .issuer_name(_name("LineInspect test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def issue(self, cn: str, server: bool = False) -> tuple[Path, Path]:
        """(certificate, key) files for ``cn``."""
        cert_path, key_path = self.root / f"{cn}.crt", self.root / f"{cn}.key"
        if cert_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(self.ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path


class Broker:
    """Mosquitto on a free loopback port: mutual TLS + ACL (and a password listener)."""

    def __init__(self, root: Path, pki: Pki, exe: str) -> None:
        self.root = root
        self.pki = pki
        self.exe = exe
        self.port = free_tcp_port()
        self.pw_port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        server_cert, server_key = pki.issue("localhost", server=True)
        self.passwd = root / "passwd"
        self.passwd.write_text("")
        (root / "data").mkdir(exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(f"""
per_listener_settings false
allow_anonymous false
user {getpass.getuser()}
persistence true
persistence_location {root / "data"}/
max_packet_size 4194304
max_queued_messages 100000
acl_file {ACL_FILE}
password_file {self.passwd}
listener {self.port} 127.0.0.1
cafile {pki.ca_file}
certfile {server_cert}
keyfile {server_key}
require_certificate true
use_identity_as_username true
listener {self.pw_port} 127.0.0.1
cafile {pki.ca_file}
certfile {server_cert}
keyfile {server_key}
require_certificate false
log_dest file {root / "mosquitto.log"}
log_type error
log_type warning
log_type notice
""")

    def add_password(self, user: str, password: str) -> None:
        """Add a user (mosquitto_passwd); takes effect at the next (re)start."""
        tool = require_tool("mosquitto_passwd")
        subprocess.run(
            [tool, "-b", str(self.passwd), user, password], check=True, capture_output=True
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.root / "mosquitto.log"
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{text}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port")

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget(proc)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes] | None) -> None:
        # a kill on another thread (tests kill the broker from a callback) may finish after
        # the test has already started the next broker: that one must not be forgotten
        if self.proc is proc:
            self.proc = None

    def log_text(self) -> str:
        p = self.root / "mosquitto.log"
        return p.read_text() if p.exists() else ""


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    exe = require_tool("mosquitto")
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker", pki, exe)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or cond}")


# -- model update rig (shared by test_updates and test_fleet) ---------------------------


@dataclass
class Packages:
    key: Ed25519PrivateKey
    pub: Path
    v: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    root = tmp_path_factory.mktemp("packages")
    kp = write_keypair(root / "keys")
    key = load_private_key(kp.private_key)
    pk = Packages(key, kp.public_key)
    for v in ("1.0.0", "1.1.0", "0.9.0"):
        pk.v[v] = build_package(root, v, key)
    pk.v["1.2.0-bad"] = build_package(root, "1.2.0", key, bad_reference=True)
    return pk


@dataclass
class Rig:
    broker: Broker
    tmp: Path
    pk: Packages
    releases: ReleaseStore
    chunks: ChunkServer
    rollout: RolloutController
    agents: dict[str, Agent] = field(default_factory=dict)
    stores: dict[str, ResultStore] = field(default_factory=dict)
    activated: list[tuple[str, Path]] = field(default_factory=list)

    def add_agent(self, device: str, *, activate_fails: bool = False, **updates: Any) -> Agent:
        cfg = uplink_config(
            self.broker,
            self.tmp,
            device,
            updates={
                "trusted_keys": [self.pk.pub],
                "chunk_window": 4,
                "chunk_timeout_s": 2.0,
                **updates,
            },
        )
        slots = SlotStore(cfg.updates.slots_dir)
        v1 = self.pk.v["1.0.0"]
        slots.install(v1, slot_name_for("toy-brightness", "1.0.0", sha256(v1)), "1.0.0")
        keys = [load_public_key(self.pk.pub)]

        def activate(path: Path) -> None:
            if activate_fails:
                raise RuntimeError("swap refused")
            with load_package(path, keys) as p:
                self.activated.append((device, Path(p.manifest.version)))

        store = make_store(self.tmp / f"{device}-store")
        agent = Agent(
            cfg,
            device,
            source=store,
            trusted_keys=keys,
            activate=activate,
            validate=lambda p: validate_package(p, keys),
        )
        agent.start()
        assert agent.link.wait_connected(10), agent.link.stats.last_error
        self.agents[device] = agent
        self.stores[device] = store
        return agent

    def release(
        self,
        version: str,
        *,
        key: Ed25519PrivateKey | None = None,
        chunk_size: int = 2048,
        **kw: Any,
    ) -> SignedRelease:
        pkg = self.pk.v[version]
        rel = make_release(
            pkg,
            key or self.pk.key,
            group="default",
            chunk_size=chunk_size,
            rollout=kw.pop("rollout", RolloutSettings(stage_timeout_s=60)),
            **kw,
        )
        self.releases.add(rel, pkg)
        return rel

    def status(self, device: str) -> str:
        st = self.rollout.status.get(device)
        return "" if st is None else st.phase

    def final(self, device: str, rid: str, timeout_s: float = 30) -> tuple[str, str]:
        def done() -> bool:
            st = self.rollout.status.get(device)
            return (
                st is not None
                and st.release_id == rid
                and st.phase
                in ("done", "failed", "refused", "rolled_back", "cancelled", "watching")
            )

        wait_until(done, timeout_s, f"{device} to finish {rid}")
        st = self.rollout.status[device]
        return st.phase, st.message


def sha256(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def rig(broker: Broker, tmp_path: Path, packages: Packages) -> Iterator[Rig]:
    releases = ReleaseStore(tmp_path / "fleet")
    chunks = ChunkServer(fleet_settings(broker, "chunks-1"), releases)
    rollout = RolloutController(fleet_settings(broker, "rollout-1"), releases)
    chunks.start()
    rollout.start()
    assert chunks.link.wait_connected(10)
    assert rollout.link.wait_connected(10)
    assert chunks.link.wait_subscribed(10)
    assert rollout.link.wait_subscribed(10)
    r = Rig(broker, tmp_path, packages, releases, chunks, rollout)
    try:
        yield r
    finally:
        for a in r.agents.values():
            a.stop()
        for s in r.stores.values():
            s.stop()
        chunks.stop()
        rollout.stop()
        releases.close()
        # pytest shows captured output only for a failing test: the broker's side of it
        print("mosquitto log (tail):\n" + broker.log_text()[-6000:])


def active(agent: Agent) -> str | None:
    assert agent.updates is not None
    ptr = agent.updates.slots.read()
    return ptr.version_of(ptr.active)


HEALTH_FAST: dict[str, Any] = {"health": {"window_s": 1.0, "min_verdicts": 10}}
