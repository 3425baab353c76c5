"""``lineinspect panel``: manage panel accounts and API tokens from a shell.

    lineinspect panel user add NAME --role technician   (asks for the password)
    lineinspect panel user passwd NAME
    lineinspect panel user role NAME admin
    lineinspect panel user del NAME
    lineinspect panel user list
    lineinspect panel token add NAME --user USER         (prints the token once)
    lineinspect panel token list | revoke ID
    lineinspect panel audit [--limit N]

The accounts live in ``<data-dir>/panel.sqlite``; ``--data-dir`` defaults to
``var/panel`` (the folder ``lineinspect run``/``demo`` give the panel).
Passwords are read from the terminal, or from stdin with ``--password-stdin``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("var/panel")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``lineinspect panel ...``."""
    p = sub.add_parser(
        "panel",
        help="web panel accounts, API tokens and audit log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="panel data folder holding panel.sqlite (default: %(default)s)",
    )
    what = p.add_subparsers(dest="panel_what", metavar="{user,token,audit}")

    user = what.add_parser("user", help="panel accounts")
    uact = user.add_subparsers(dest="user_action", metavar="{add,passwd,role,del,list}")
    add = uact.add_parser("add", help="create an account")
    add.add_argument("username")
    add.add_argument("--role", default="operator", choices=["operator", "technician", "admin"])
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin",
    )
    add.set_defaults(func=_user_add)
    pw = uact.add_parser("passwd", help="set an account's password (logs it out everywhere)")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true")
    pw.set_defaults(func=_user_passwd)
    role = uact.add_parser("role", help="change an account's role")
    role.add_argument("username")
    role.add_argument("role", choices=["operator", "technician", "admin"])
    role.set_defaults(func=_user_role)
    rm = uact.add_parser("del", help="delete an account")
    rm.add_argument("username")
    rm.set_defaults(func=_user_del)
    ls = uact.add_parser("list", help="list accounts")
    ls.set_defaults(func=_user_list)

    tok = what.add_parser("token", help="API tokens for automation")
    tact = tok.add_subparsers(dest="token_action", metavar="{add,list,revoke}")
    tadd = tact.add_parser("add", help="create a token (printed once)")
    tadd.add_argument("name")
    tadd.add_argument("--user", required=True, help="account whose role the token carries")
    tadd.set_defaults(func=_token_add)
    tls = tact.add_parser("list", help="list tokens")
    tls.set_defaults(func=_token_list)
    trv = tact.add_parser("revoke", help="revoke a token")
    trv.add_argument("id", type=int)
    trv.set_defaults(func=_token_revoke)

    aud = what.add_parser("audit", help="print the audit log, newest first")
    aud.add_argument("--limit", type=int, default=50)
    aud.set_defaults(func=_audit)


def _db(args: argparse.Namespace) -> Any:
    from edge.web.auth import PanelDb

    return PanelDb(Path(args.data_dir) / "panel.sqlite")


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat: "):
        raise ValueError("the two passwords differ")
    return first


def _run(fn: Any) -> int:
    from edge.web.auth import AuthError

    try:
        fn()
    except (AuthError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _user_add(args: argparse.Namespace) -> int:
    from edge.web.auth import Role

    def go() -> None:
        db = _db(args)
        db.create_user(args.username, _read_password(args), Role.parse(args.role))
        db.audit("cli", "user.add", args.username, None, args.role, "cli")
        print(f"created {args.role} {args.username}")

    return _run(go)


def _user_passwd(args: argparse.Namespace) -> int:
    def go() -> None:
        db = _db(args)
        if db.user(args.username) is None:
            raise ValueError(f"no user {args.username!r}")
        db.set_password(args.username, _read_password(args))
        db.audit("cli", "user.password", args.username, None, None, "cli")
        print(f"password of {args.username} changed")

    return _run(go)


def _user_role(args: argparse.Namespace) -> int:
    from edge.web.auth import Role

    def go() -> None:
        db = _db(args)
        old = db.user(args.username)
        db.set_role(args.username, Role.parse(args.role))
        db.audit(
            "cli", "user.role", args.username, old.role.label if old else None, args.role, "cli"
        )
        print(f"{args.username} is now {args.role}")

    return _run(go)


def _user_del(args: argparse.Namespace) -> int:
    def go() -> None:
        db = _db(args)
        db.delete_user(args.username)
        db.audit("cli", "user.delete", args.username, None, None, "cli")
        print(f"deleted {args.username}")

    return _run(go)


def _user_list(args: argparse.Namespace) -> int:
    for u in _db(args).users():
        print(
            f"{u.username}\t{u.role.label}\t"
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(u.created_unix))}"
        )
    return 0


def _token_add(args: argparse.Namespace) -> int:
    def go() -> None:
        db = _db(args)
        secret, tok = db.create_token(args.user, args.name)
        db.audit("cli", "token.add", f"{tok.id}:{tok.name}", None, args.user, "cli")
        print(secret)

    return _run(go)


def _token_list(args: argparse.Namespace) -> int:
    for t in _db(args).tokens():
        used = (
            "never"
            if t.last_used_unix is None
            else time.strftime("%Y-%m-%d %H:%M", time.localtime(t.last_used_unix))
        )
        print(f"{t.id}\t{t.name}\t{t.username}\tlast used {used}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    def go() -> None:
        db = _db(args)
        db.revoke_token(args.id)
        db.audit("cli", "token.revoke", str(args.id), None, None, "cli")
        print(f"revoked token {args.id}")

    return _run(go)


def _audit(args: argparse.Namespace) -> int:
    import json

    entries, _ = _db(args).audit_entries(args.limit, 0)
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time_unix))
        print(
            f"{when}\t{e.username}\t{e.action}\t{e.target}\t"
            f"{json.dumps(e.old, ensure_ascii=False)} -> {json.dumps(e.new, ensure_ascii=False)}"
        )
    return 0
