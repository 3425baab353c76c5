"""The one configuration: a YAML file mapped to one pydantic root model.

Each package owns its section's model; this module only assembles them and
loads / checks files. Secrets never live in YAML: see :class:`SecretRef`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from cloud_sync.config import UplinkConfig
from edge.capture.config import CameraConfig
from edge.config_base import StrictModel
from edge.config_check import Problem, YamlProblemsError, load_yaml, validation_problems
from edge.runtime_config import BackendSection, ModelConfig, PipelineConfig, StoreConfig
from edge.web.config import PanelConfig
from plc.config import PlcConfig


class StationConfig(StrictModel):
    name: str = Field(
        "station-1", title="Station name", description="Human name of this inspection station."
    )
    device_id: str = Field(
        "lineinspect-dev",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        title="Device id",
        description="Unique id of this appliance in the fleet (MQTT topics).",
    )


class LineInspectConfig(StrictModel):
    """Root of the LineInspect configuration file."""

    station: StationConfig = Field(
        default_factory=StationConfig, title="Station", description="Identity of this appliance."
    )
    camera: CameraConfig = Field(
        default_factory=CameraConfig,
        title="Camera",
        description="Frame source and acquisition mode.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, title="Model", description="Which model package to run."
    )
    backend: BackendSection = Field(
        default_factory=BackendSection,
        title="Backend",
        description="Inference backend, fallback and watchdog.",
    )
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, title="Pipeline", description="Decision settings."
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig,
        title="Result store",
        description="Where verdicts and images are kept.",
    )
    plc: PlcConfig = Field(
        default_factory=PlcConfig, title="PLC", description="Modbus link to the line's PLC."
    )
    uplink: UplinkConfig = Field(
        default_factory=UplinkConfig, title="Uplink", description="MQTT device agent for the fleet."
    )
    panel: PanelConfig = Field(
        default_factory=PanelConfig, title="Web panel", description="Technician web panel."
    )


class ConfigError(Exception):
    """A configuration file that cannot be used.

    ``problems`` lists (key path, message, hint); ``details`` holds the same
    as :class:`~edge.config_check.Problem` objects, with the line in the file.
    """

    def __init__(
        self,
        path: Path | None,
        problems: list[tuple[str, str, str]],
        details: list[Problem] | None = None,
    ) -> None:
        self.path = path
        self.problems = problems
        self.details = details if details is not None else [Problem(*p) for p in problems]
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(f"{k}: {m}" for k, m, _ in problems))

    @classmethod
    def from_problems(cls, path: Path | None, details: list[Problem]) -> ConfigError:
        """Build from problems, ordered by their line in the file."""
        details = sorted(details, key=lambda p: (p.line is None, p.line or 0))
        return cls(path, [(p.key, p.message, p.hint) for p in details], details)

    def report(self) -> str:
        """Every problem on its own line(s), with the file, line, key path and hint."""
        where = str(self.path) if self.path else ""
        return "\n".join(p.format(where) for p in self.details)


def parse_config(
    data: Any, path: Path | None = None, lines: dict[str, int] | None = None
) -> LineInspectConfig:
    """Validate already-parsed YAML data; raises :class:`ConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.from_problems(
            path,
            [
                Problem(
                    "(root)",
                    f"the file must hold a mapping of sections, not {type(data).__name__}",
                    "start with a section name such as 'camera:' at column 0",
                    1,
                )
            ],
        )
    try:
        return LineInspectConfig.model_validate(data)
    except ValidationError as exc:
        details = validation_problems(LineInspectConfig, exc, data, lines or {})
        raise ConfigError.from_problems(path, details) from None


def parse_config_text(text: str, path: Path | None = None) -> LineInspectConfig:
    """Parse and validate YAML text (duplicate keys are problems too)."""
    try:
        data, lines, dupes = load_yaml(text)
    except YamlProblemsError as exc:
        raise ConfigError.from_problems(path, exc.problems) from None
    try:
        config = parse_config(data, path, lines)
    except ConfigError as exc:
        raise ConfigError.from_problems(path, dupes + exc.details) from None
    if dupes:
        raise ConfigError.from_problems(path, dupes)
    return config


def load_config(path: Path) -> LineInspectConfig:
    """Read, parse and validate a configuration file; raises :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.from_problems(
            path,
            [
                Problem(
                    "(file)",
                    "no such file",
                    "check the path (relative paths start in the current folder)",
                )
            ],
        ) from None
    except IsADirectoryError:
        raise ConfigError.from_problems(
            path, [Problem("(file)", "is a folder, not a file", "give the path of the YAML file")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError.from_problems(
            path,
            [
                Problem(
                    "(file)",
                    f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                    "save the file as UTF-8",
                )
            ],
        ) from None
    except OSError as exc:
        raise ConfigError.from_problems(
            path,
            [Problem("(file)", exc.strerror or str(exc), "check the path and its permissions")],
        ) from None
    return parse_config_text(text, path)
