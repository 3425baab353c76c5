"""Whatever the file holds, checking it ends in a config or in a ConfigError, never a crash."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import ConfigError, LineInspectConfig, parse_config_text

KEYS = st.sampled_from(
    [
        "camera",
        "source",
        "type",
        "folder",
        "path",
        "rate_fps",
        "mode",
        "plc",
        "port",
        "uplink",
        "password",
        "env",
        "station",
        "name",
        "reconnect",
        "factor",
        "defects",
        "x",
        "0",
        "device",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["synthetic", "folder", "device", "video", "stream", "triggered"]),
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=5)))
def test_any_yaml_data_is_either_valid_or_explained(data: Any) -> None:
    outcome = _check(yaml.safe_dump(data))
    if isinstance(outcome, ConfigError):
        _assert_explained(outcome)
    else:
        assert isinstance(outcome, LineInspectConfig)


def _check(text: str) -> LineInspectConfig | ConfigError:
    try:
        return parse_config_text(text)
    except ConfigError as exc:
        return exc


def _assert_explained(err: ConfigError) -> None:
    assert err.details
    for problem in err.details:
        assert problem.key
        assert problem.message
    assert err.report()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_either_valid_or_explained(text: str) -> None:
    outcome = _check(text)
    if isinstance(outcome, ConfigError):
        _assert_explained(outcome)
