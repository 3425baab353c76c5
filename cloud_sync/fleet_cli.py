"""``lineinspect fleet ...``: keys, releases, rollouts, ingest and the status table.

Broker options are shared by the commands that talk MQTT (publish, cancel,
serve): ``--host``, ``--port``, TLS files, and ``--username`` with the
password taken from an environment variable (``--password-env``), never
from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_sync.mqtt import LinkSettings


def _broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--host", default="127.0.0.1", help="MQTT broker host")
    g.add_argument("--port", type=int, default=8883, help="MQTT broker port")
    g.add_argument("--ca", type=Path, help="CA certificate (PEM); enables TLS")
    g.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    g.add_argument("--cert-key", type=Path, help="client certificate's private key (PEM)")
    g.add_argument("--username", help="MQTT user name")
    g.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the MQTT password"
    )
    g.add_argument("--client-id", default=None, help="MQTT client id (default: generated)")
    g.add_argument("--prefix", default="lineinspect/v1", help="topic prefix")


def _settings(args: argparse.Namespace, role: str) -> LinkSettings:
    from cloud_sync.mqtt import LinkSettings

    password = os.environ.get(args.password_env) if args.password_env else None
    if args.password_env and password is None:
        raise SystemExit(f"error: environment variable {args.password_env} is not set")
    cid = args.client_id or f"lineinspect-{role}-{os.getpid()}"
    return LinkSettings(
        host=args.host,
        port=args.port,
        client_id=f"{cid}" if role == "main" else f"{cid}-{role}",
        protocol="5",
        username=args.username,
        password=password,
        tls=args.ca is not None,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.cert_key,
    )


def register_fleet(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``fleet`` command group."""
    fleet = sub.add_parser(
        "fleet",
        help="fleet side: keys, releases, rollouts, ingest, status",
        description="Fleet operations over MQTT (see docs/fleet.md).",
    )
    fs = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND")
    fleet.set_defaults(func=lambda _a: (fleet.print_help(), 2)[1])

    p = fs.add_parser("keygen", help="generate an Ed25519 release-signing key pair")
    p.add_argument("--out", type=Path, required=True, help="folder for the two PEM files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=_cmd_keygen)

    p = fs.add_parser("sign", help="sign a model package (folder or .tar) in place")
    p.add_argument("package", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    p.set_defaults(func=_cmd_sign)

    p = fs.add_parser("publish", help="sign a release of a package and roll it out to a group")
    p.add_argument("package", type=Path, help="model package .tar")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    p.add_argument("--group", required=True, help="target group ('*' for every device)")
    p.add_argument("--canary-share", type=float, default=0.1, help="share updated first")
    p.add_argument(
        "--failure-threshold",
        type=float,
        default=0.2,
        help="pause when this share of a stage fails",
    )
    p.add_argument("--stage-timeout", type=float, default=1800.0, help="seconds per stage")
    p.add_argument(
        "--rollback", action="store_true", help="explicit, signed downgrade to an older version"
    )
    p.add_argument(
        "--url", help="HTTP(S) URL devices download the package from (default: chunks over MQTT)"
    )
    p.add_argument("--chunk-size", type=int, default=256 * 1024, help="bytes per chunk")
    p.add_argument("--devices", nargs="*", help="only these devices (default: the group)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var/fleet"),
        help="where releases and the rollout ledger are kept",
    )
    _broker_args(p)
    p.set_defaults(func=_cmd_publish)

    p = fs.add_parser("cancel", help="cancel a rollout (devices not yet done stop)")
    p.add_argument("release_id")
    p.add_argument("--state-dir", type=Path, default=Path("var/fleet"))
    _broker_args(p)
    p.set_defaults(func=_cmd_cancel)

    p = fs.add_parser("status", help="fleet status table from the ingest database")
    p.add_argument(
        "--db",
        default="var/fleet/ingest.sqlite",
        help="ingest database (path, sqlite:///path or postgresql://...)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--release", help="also show the rollout ledger of this release")
    p.add_argument("--state-dir", type=Path, default=Path("var/fleet"))
    p.set_defaults(func=_cmd_status)

    p = fs.add_parser("serve", help="run ingest workers and the chunk server")
    p.add_argument(
        "--db",
        default="var/fleet/ingest.sqlite",
        help="ingest database (path, sqlite:///path or postgresql://...)",
    )
    p.add_argument("--workers", type=int, default=1, help="ingest workers in this process")
    p.add_argument("--state-dir", type=Path, default=Path("var/fleet"))
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="also serve release packages over HTTP with range requests",
    )
    _broker_args(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from models.signing import write_keypair

    try:
        kp = write_keypair(args.out, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"private key: {kp.private_key}\npublic key:  {kp.public_key}\n"
        f"fingerprint: {kp.fingerprint}"
    )
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from models.package import PackageError, sign_package
    from models.signing import KeyFileError, load_private_key

    try:
        fp = sign_package(args.package, load_private_key(args.key))
    except (KeyFileError, PackageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"signed {args.package} with key {fp}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from cloud_sync.fleet import ChunkServer, ReleaseStore, RolloutController, make_release
    from cloud_sync.topics import RolloutSettings
    from models.package import PackageError
    from models.signing import KeyFileError, load_private_key

    try:
        key = load_private_key(args.key)
        rollout = RolloutSettings(
            canary_share=args.canary_share,
            failure_threshold=args.failure_threshold,
            stage_timeout_s=args.stage_timeout,
        )
        release = make_release(
            args.package,
            key,
            group=args.group,
            chunk_size=args.chunk_size,
            url=args.url,
            rollback=args.rollback,
            rollout=rollout,
        )
    except (KeyFileError, PackageError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    store = ReleaseStore(args.state_dir)
    store.add(release, args.package)
    print(
        f"release {release.manifest.release_id}: {release.manifest.package_name} "
        f"{release.manifest.version} ({release.manifest.size_bytes} bytes) -> group "
        f"{args.group}",
        file=sys.stderr,
    )
    chunks = ChunkServer(_settings(args, "chunks"), store, prefix=args.prefix)
    ctl = RolloutController(_settings(args, "rollout"), store, prefix=args.prefix)
    chunks.start()
    ctl.start()
    try:
        if not ctl.link.wait_connected(15):
            print(f"error: cannot reach the broker: {ctl.link.stats.last_error}", file=sys.stderr)
            return 1
        result = ctl.rollout(release, devices=args.devices or None)
    finally:
        ctl.stop()
        chunks.stop()
        store.close()
    print(result.to_json())
    return 0 if result.status == "completed" else 3


def _cmd_cancel(args: argparse.Namespace) -> int:
    from cloud_sync.fleet import ReleaseStore, RolloutController

    store = ReleaseStore(args.state_dir)
    entry = store.get(args.release_id)
    if entry is None:
        print(f"error: no release {args.release_id} in {args.state_dir}", file=sys.stderr)
        return 1
    ctl = RolloutController(_settings(args, "cancel"), store, prefix=args.prefix)
    ctl.start()
    try:
        if not ctl.link.wait_connected(15):
            print(f"error: cannot reach the broker: {ctl.link.stats.last_error}", file=sys.stderr)
            return 1
        time.sleep(1.0)  # retained statuses arrive
        devices = [row[0] for row in store.ledger(args.release_id)]
        n = ctl.cancel(args.release_id, devices)
        time.sleep(0.5)
    finally:
        ctl.stop()
        store.close()
    print(f"cancel sent to {n} device(s)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cloud_sync.ingest import IngestDB, format_status_table

    db = IngestDB(args.db)
    rows = db.devices()
    db.close()
    if args.json:
        print(
            json.dumps(
                [
                    r.__dict__
                    if hasattr(r, "__dict__")
                    else {f: getattr(r, f) for f in r.__slots__}
                    for r in rows
                ],
                indent=1,
            )
        )
    else:
        print(format_status_table(rows))
    if args.release:
        from cloud_sync.fleet import ReleaseStore

        store = ReleaseStore(args.state_dir)
        print(f"\nrelease {args.release}: {store.status(args.release) or 'unknown'}")
        for device, stage, phase, message in store.ledger(args.release):
            print(f"  {device:24} {stage:7} {phase:12} {message}")
        store.close()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cloud_sync.fleet import ChunkServer, PackageHttpServer, ReleaseStore
    from cloud_sync.ingest import IngestDB, IngestWorker

    store = ReleaseStore(args.state_dir)
    db = IngestDB(args.db)
    parts: list[Any] = [ChunkServer(_settings(args, "chunks"), store, prefix=args.prefix)]
    parts += [
        IngestWorker(_settings(args, f"ingest{i}"), db, prefix=args.prefix)
        for i in range(args.workers)
    ]
    http = PackageHttpServer(store, port=args.http_port) if args.http_port else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for p in parts:
        p.start()
    if http is not None:
        http.start()
        print(
            f"serving packages on http://{http.host}:{http.port}/releases/<id>/package.tar",
            file=sys.stderr,
        )
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for p in parts:
            p.stop()
        if http is not None:
            http.stop()
        db.close()
        store.close()
    return 0
