"""The four diagnostic classes and how dataset folder names map onto them."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("MI", "HMI", "AHB", "NORM")
"""Canonical class order: model outputs, probability columns and reports follow it."""

CLASS_SLUGS: dict[str, str] = {cls: cls.lower() for cls in CLASSES}
"""Lower-case names used in metric and column names (`test_f1_mi`, `prob_mi`)."""

MENDELEY_FOLDERS: dict[str, str] = {
    "ECG Images of Myocardial Infarction Patients (240x12=2880)": "MI",
    "ECG Images of Patient that have History of MI (172x12=2064)": "HMI",
    "ECG Images of Patient that have abnormal heartbeat (233x12=2796)": "AHB",
    "Normal Person ECG Images (284x12=3408)": "NORM",
}
"""The folder names of Mendeley Data gwbz3fsgp8 v2, exactly as published."""


class UnknownClassFolder(ValueError):
    """A dataset folder whose name matches none of the four classes."""


def class_for_folder(name: str) -> str:
    """Map a class folder name (Mendeley name or short name, any case) to its class."""
    if name in MENDELEY_FOLDERS:
        return MENDELEY_FOLDERS[name]
    short = name.strip().upper()
    if short in CLASSES:
        return short
    raise UnknownClassFolder(
        f"class folder {name!r} is not one of the four classes: use the Mendeley folder "
        f"names or the short names {', '.join(CLASSES)}"
    )
