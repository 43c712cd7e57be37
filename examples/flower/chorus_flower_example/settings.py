"""Settings shared by both apps: from the run config, with the client's node config on top."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def workdir(run_config: Mapping[str, object]) -> Path:
    """Absolute as given, else under the home directory (a ServerApp's working directory is
    Flower's app cache, not where ``flwr run`` was typed)."""
    path = Path(str(run_config.get("workdir") or "chorus-flower-run")).expanduser()
    return path if path.is_absolute() else Path.home() / path


def targets(run_config: Mapping[str, object]) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(run_config.get("target-modules", "q_proj,v_proj"))
                 .split(",") if t.strip())
