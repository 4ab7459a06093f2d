"""The base of every config section (backend.config and its per-section modules): unknown keys are
errors, assignments are validated, and no text holds a NUL character. Torch-free."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        """No text field may hold a NUL character: paths with one cannot be opened (the OS refuses
        them) and no name or prompt needs one."""
        if isinstance(v, str) and "\x00" in v:
            raise ValueError("must not contain a NUL character (\\x00)")
        if isinstance(v, list) and any(isinstance(x, str) and "\x00" in x for x in v):
            raise ValueError("must not contain a NUL character (\\x00)")
        return v
