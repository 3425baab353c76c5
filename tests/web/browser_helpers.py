"""Debian's Chromium driven by Playwright: fixed flags, a fresh profile, no network chatter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextmanager
def chromium_context(
    executable: str, profile: Path, viewport: tuple[int, int] = (1280, 800)
) -> Iterator[Any]:
    """A persistent browser context on a fresh user-data-dir, closed afterwards."""
    from playwright.sync_api import sync_playwright

    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": viewport[0], "height": viewport[1]},
            locale="en-US",
            bypass_csp=True,
        )  # the test's own wait_for_function() predicates need eval
        try:
            yield ctx
        finally:
            ctx.close()
