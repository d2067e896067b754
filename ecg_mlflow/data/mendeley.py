"""The published Mendeley v2 dataset: its file facts, and checking a folder against them.

The facts (relpath, class, sha256, bytes, width, height of all 928 originals) ship as
package data, so `ecg-mlflow data verify` works offline on any download.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ecg_mlflow.data.classes import UnknownClassFolder, class_for_folder
from ecg_mlflow.data.manifest import DatasetError, is_stray
from ecg_mlflow.data.hashing import sha256_hex

MENDELEY_URL = "https://data.mendeley.com/public-api/zip/gwbz3fsgp8/download/2"
"""Public download of "ECG Images dataset of Cardiac Patients", Mendeley Data v2
(DOI 10.17632/gwbz3fsgp8.2, CC BY 4.0)."""

FACTS_RESOURCE = "mendeley-v2-originals.csv"

# Exit codes of `data verify` / `data download`: a bit per kind of mismatch. 1 and 2 stay
# free for click's own errors (bad usage, unreadable folder).
EXIT_MISSING = 8
EXIT_CHANGED = 16
EXIT_EXTRA = 32


@dataclass(frozen=True)
class FileFact:
    relpath: str
    label: str
    sha256: str
    nbytes: int
    width: int
    height: int


@dataclass(frozen=True)
class Verification:
    root: Path
    n_expected: int
    matched: tuple[str, ...]
    missing: tuple[str, ...]  # expected relpaths not found
    changed: tuple[str, ...]  # found relpaths whose SHA-256 differs
    extra: tuple[str, ...]  # found relpaths not in the facts

    @property
    def exit_code(self) -> int:
        """0 when every file matches, else EXIT_MISSING | EXIT_CHANGED | EXIT_EXTRA as found."""
        return (
            (EXIT_MISSING if self.missing else 0)
            | (EXIT_CHANGED if self.changed else 0)
            | (EXIT_EXTRA if self.extra else 0)
        )

    def summary(self) -> str:
        return (
            f"{len(self.matched)} of {self.n_expected} files match, {len(self.missing)} missing, "
            f"{len(self.changed)} changed, {len(self.extra)} extra"
        )


def load_facts() -> tuple[FileFact, ...]:
    """The 928 file facts of Mendeley v2, read from the package data.

    The CSV's `class` column holds the file-name prefix (MI, PMI, HB, Normal); the label
    here is the canonical class of the file's folder."""
    text = resources.files("ecg_mlflow").joinpath("package_data", FACTS_RESOURCE).read_text("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    return tuple(
        FileFact(r["relpath"], class_for_folder(r["relpath"].split("/")[0]), r["sha256"], int(r["bytes"]), int(r["width"]), int(r["height"]))
        for r in rows
    )


def _key(relpath: str) -> tuple[str, str] | None:
    """(class, file name): folders may be renamed to their short names and still match."""
    folder, _, name = relpath.rpartition("/")
    try:
        return class_for_folder(folder.split("/")[-1]), name
    except UnknownClassFolder:
        return None


def _found_files(root: Path) -> dict[str, Path]:
    """relpath -> path of every non-stray file in the class folders (and beside them)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(is_stray(part) for part in rel.parts):
            found[rel.as_posix()] = path
    return found


def verify(root: str | Path, facts: tuple[FileFact, ...] | None = None) -> Verification:
    """Compare `root` file by file (SHA-256) with the published facts."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    facts = load_facts() if facts is None else facts
    expected = {_key(f.relpath): f for f in facts}
    matched, changed, extra = [], [], []
    seen: set[tuple[str, str]] = set()
    for relpath, path in _found_files(root).items():
        key = _key(relpath)
        fact = expected.get(key) if key else None
        if fact is None:
            extra.append(relpath)
            continue
        seen.add(key)
        same = path.stat().st_size == fact.nbytes and sha256_hex(path.read_bytes()) == fact.sha256
        (matched if same else changed).append(relpath)
    missing = sorted(f.relpath for k, f in expected.items() if k not in seen)
    return Verification(root, len(facts), tuple(matched), tuple(missing), tuple(changed), tuple(extra))
