"""Parameter parsers: the one set every command, entry point and config uses.

MLflow passes entry point parameters as strings and checks no types, so each value is parsed
here, and a bad one raises ConfigError with one line naming the parameter; the commands turn
it into a usage error (exit status 2).
"""

from __future__ import annotations

import math
import re
from typing import Sequence


class ConfigError(ValueError):
    """A parameter value that cannot be used; the message names the parameter."""


def parse_int(name: str, raw, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer parameter in [minimum, maximum], or one ConfigError naming it."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if maximum is not None and (value is None or not minimum <= value <= maximum):
        raise ConfigError(f"{name} must be an integer from {minimum} to {maximum}, got {raw!r}")
    if value is None:
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def parse_float(name: str, raw, low: float, high: float, *, low_open: bool = True) -> float:
    """A finite number in (low, high) or, with low_open=False, [low, high)."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value >= high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must lie in {bracket}{low}, {high}), got {raw!r}")
    return value


def parse_choice(name: str, raw, choices: Sequence[str]) -> str:
    value = str(raw).strip()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return value


def parse_bool(name: str, raw) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def parse_seeds(raw, *, name: str = "seeds", max_seeds: int = 1000) -> tuple[int, ...]:
    """'1' -> (1,); '1,2,5' -> (1, 2, 5); '1-10' and mixed '1-3,7' work too. Sorted,
    distinct, non-negative; the one parser of seed lists (study, tune, analysis, k8s)."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(raw).split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ConfigError(f"{name} must look like 1-10 or 1,2,5; got {raw!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ConfigError(f"{name}: range {part!r} runs backwards; write {high}-{low}")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{name} must be distinct; got {raw!r}")
    if len(seeds) > max_seeds:
        raise ConfigError(f"{name}: at most {max_seeds} seeds; got {len(seeds)}")
    return tuple(sorted(seeds))


def parse_dense_units(raw) -> tuple[int, ...]:
    """'1024,512' -> (1024, 512); one to four positive layer widths."""
    parts = [p.strip() for p in str(raw).split(",") if p.strip()]
    try:
        units = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"dense_units must be comma-separated integers like 1024,512; got {raw!r}") from None
    if not 1 <= len(units) <= 4 or min(units) < 1:
        raise ConfigError(f"dense_units must be 1 to 4 positive integers like 1024,512; got {raw!r}")
    return units
