"""No usage reports leave the machine from ecg-mlflow's processes.

Two of the libraries report usage by default. MLflow 3 sends usage events unless
MLFLOW_DISABLE_TELEMETRY (or DO_NOT_TRACK) is set. OpenVINO's converter sends Google
Analytics events on every `convert_model` unless its consent file says no. It forks a
process for each event, 24 per backbone conversion, measured here. Reports of this kind are
not for hospital machines, so both are off here. Each library's own opt-in still counts: an
explicit MLFLOW_DISABLE_TELEMETRY=false, or `opt_in_out --opt_in` (OpenVINO's consent file
holding "1").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import MutableMapping

MLFLOW_SWITCH = "MLFLOW_DISABLE_TELEMETRY"
OPENVINO_TELEMETRY_MODULE = "openvino_telemetry"


def openvino_consent_file() -> Path:
    """Where OpenVINO keeps its telemetry consent (openvino_telemetry's OptInChecker)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", "")) / "Intel Corporation" / "openvino_telemetry"
    return Path.home() / "intel" / "openvino_telemetry"


def openvino_opted_in(consent_file: Path) -> bool:
    try:
        return consent_file.read_text().strip() == "1"
    except OSError:
        return False


def keep_usage_data_local(environ: MutableMapping[str, str] = os.environ,
                          modules: MutableMapping[str, object] = sys.modules,
                          consent_file: Path | None = None) -> None:
    """Turn off MLflow's and OpenVINO's usage reports in this process and its children,
    unless the user opted in. Call it before OpenVINO is imported: OpenVINO's converter
    imports its telemetry package when `openvino` is imported, and falls back to its own
    no-op stub when that package cannot be imported, as if it were not installed."""
    environ.setdefault(MLFLOW_SWITCH, "true")
    if OPENVINO_TELEMETRY_MODULE in modules:
        return  # already imported by someone else: their choice
    if not openvino_opted_in(consent_file or openvino_consent_file()):
        modules[OPENVINO_TELEMETRY_MODULE] = None  # `import openvino_telemetry` raises ImportError
