"""Resolve a ``--study`` argument: a study file (its ``[study] name``) or a study name."""

from __future__ import annotations

from pathlib import Path


def study_name(ref: str) -> str:
    """``jobs/mini_study.toml`` -> its ``[study] name`` (validated); anything else is a name."""
    if ref.endswith(".toml") or Path(ref).is_file():
        from ..sweep import load_study

        return load_study(ref).name
    return ref
