"""Shared pieces for every configuration section."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, models are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SecretRef(StrictModel):
    """Where a secret comes from: an environment variable or a file, never YAML."""

    env: str | None = Field(
        None,
        title="Environment variable",
        description="Name of the environment variable holding the secret.",
    )
    file: Path | None = Field(
        None,
        title="Secret file",
        description="Path of a file whose content (stripped) is the secret.",
    )

    def resolve(self) -> str | None:
        """The secret's value, or None when neither source is set or present."""
        if self.env and os.environ.get(self.env):
            return os.environ[self.env]
        if self.file is not None:
            return self.file.read_text(encoding="utf-8").strip()
        return None
