"""Reading a dataset folder: class folders in, a manifest of every image out.

A dataset is a folder of class folders (Mendeley names or MI/HMI/AHB/NORM). The manifest
records each image's content (SHA-256), look (dHash) and size; its digest identifies the
dataset on every run. Problems are collected and raised once, naming every culprit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from ecg_mlflow.data.classes import CLASSES, UnknownClassFolder, class_for_folder
from ecg_mlflow.data.hashing import dhash, near_pairs, sha256_hex
from ecg_mlflow.data.preprocess import ImageDecodeError, open_image

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
IGNORED_NAMES: tuple[str, ...] = (".DS_Store", "Thumbs.db", "desktop.ini")
"""Stray files that file browsers leave behind; these and all dotfiles are ignored and counted."""


class DatasetError(ValueError):
    """A dataset folder that cannot be read as is; the message names every folder/file at fault."""


@dataclass(frozen=True)
class ImageRecord:
    relpath: str
    label: str
    sha256: str
    dhash: str
    width: int
    height: int
    nbytes: int


RECORD_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord))


@dataclass(frozen=True)
class Manifest:
    root: Path
    records: tuple[ImageRecord, ...]
    n_ignored: int = 0
    bad: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        """SHA-256 over the sorted (relpath, label, sha256) lines: the dataset's identity."""
        lines = sorted(f"{r.relpath}\t{r.label}\t{r.sha256}\n" for r in self.records)
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()

    def to_frame(self) -> pd.DataFrame:
        """One row per record, one column per ImageRecord field."""
        return pd.DataFrame([asdict(r) for r in self.records], columns=list(RECORD_COLUMNS))

    def path_of(self, record: ImageRecord) -> Path:
        return self.root.joinpath(*record.relpath.split("/"))

    def subset(self, relpaths: Iterable[str]) -> Manifest:
        """The same manifest restricted to `relpaths`; an unknown relpath is an error."""
        wanted = set(relpaths)
        unknown = wanted - {r.relpath for r in self.records}
        if unknown:
            raise DatasetError(f"not in the manifest of {self.root}: {', '.join(sorted(unknown))}")
        kept = tuple(r for r in self.records if r.relpath in wanted)
        return Manifest(self.root, kept, self.n_ignored, self.bad)


def is_stray(name: str) -> bool:
    """Files left by file browsers and version control: never data."""
    return name.startswith(".") or name in IGNORED_NAMES


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _outside(path: Path, root: Path) -> bool:
    """A symlink pointing outside the dataset folder (refused: it could read any file)."""
    return path.is_symlink() and not path.resolve().is_relative_to(root)


def scan(root: Path) -> tuple[list[tuple[str, str, Path]], int]:
    """List (relpath, label, path) of every image file; count ignored strays.

    Raises DatasetError naming every unknown or empty class folder, file outside a class
    folder, nested folder and escaping symlink.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    problems: list[str] = []
    images: list[tuple[str, str, Path]] = []
    n_ignored = 0
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if is_stray(entry.name):
            n_ignored += 1
        elif _outside(entry, root):
            problems.append(f"{entry.name}: symlink to {entry.resolve()}, outside the dataset folder")
        elif not entry.is_dir():
            problems.append(f"{entry.name}: a file at the dataset root, not inside a class folder")
        else:
            try:
                class_dirs.append((entry, class_for_folder(entry.name)))
            except UnknownClassFolder as exc:
                problems.append(str(exc))
    for folder, label in class_dirs:
        found = 0
        for entry in sorted(folder.iterdir()):
            relpath = f"{folder.name}/{entry.name}"
            if is_stray(entry.name):
                n_ignored += 1
            elif _outside(entry, root):
                problems.append(f"{relpath}: symlink to {entry.resolve()}, outside the dataset folder")
            elif entry.is_dir():
                problems.append(f"{relpath}: a folder inside a class folder (expected image files only)")
            elif not is_image_name(entry.name):
                n_ignored += 1
            else:
                images.append((relpath, label, entry))
                found += 1
        if found == 0:
            problems.append(f"class folder {folder.name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if not class_dirs and not problems:
        problems.append(f"no class folders in {root}: expected folders for {', '.join(CLASSES)}")
    if problems:
        raise DatasetError(f"dataset {root} cannot be read:\n  " + "\n  ".join(problems))
    return images, n_ignored


def read_record(relpath: str, label: str, path: Path) -> ImageRecord:
    """Hash and measure one image; ImageDecodeError says why it is bad."""
    data = path.read_bytes()
    image = open_image(data)
    width, height = image.size
    try:
        look = dhash(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from exc
    return ImageRecord(relpath, label, sha256_hex(data), look, width, height, len(data))


def unique_contents(root: str | Path) -> dict[str, Path]:
    """SHA-256 -> path (the first by relpath) of every image content in a dataset folder.

    Reads the bytes only, decodes nothing: what a feature pass needs to know which contents
    to compute, at a fraction of a manifest's cost (no dHash per image)."""
    images, _ = scan(Path(root).resolve())
    found: dict[str, Path] = {}
    for _, _, path in images:
        found.setdefault(sha256_hex(path.read_bytes()), path)
    return found


def build_manifest(root: str | Path, *, skip_bad: bool = False, progress: bool = False) -> Manifest:
    """Scan `root`, hash and measure every image.

    Bad files (empty, truncated, not an image, unsupported mode, too large) are all named in
    one DatasetError, or with `skip_bad` left out and listed in `Manifest.bad`.
    """
    root = Path(root).resolve()
    images, n_ignored = scan(root)
    if progress:
        from tqdm import tqdm

        images = tqdm(images, desc="manifest", unit="img")
    records: list[ImageRecord] = []
    bad: list[tuple[str, str]] = []
    for relpath, label, path in images:
        try:
            records.append(read_record(relpath, label, path))
        except ImageDecodeError as exc:
            bad.append((relpath, str(exc)))
    if bad and not skip_bad:
        lines = "\n  ".join(f"{relpath}: {reason}" for relpath, reason in bad)
        raise DatasetError(f"{len(bad)} bad image file(s) in {root} (use --skip-bad to exclude them):\n  {lines}")
    records.sort(key=lambda r: r.relpath)
    return Manifest(root, tuple(records), n_ignored, tuple(sorted(bad)))


def describe(manifest: Manifest) -> pd.DataFrame:
    """Per class (canonical order, then a `total` row): files, unique images, duplicate groups
    (contents present more than once) and near-duplicate pairs (distinct contents whose dHash
    lies within NEAR_DUPLICATE_DISTANCE: the same report re-encoded)."""
    rows = {}
    for label in CLASSES + ("total",):
        records = [r for r in manifest.records if label in (r.label, "total")]
        counts: dict[str, int] = {}
        hashes: dict[str, str] = {}
        for r in records:
            counts[r.sha256] = counts.get(r.sha256, 0) + 1
            hashes[r.sha256] = r.dhash
        rows[label] = {
            "files": len(records),
            "unique": len(counts),
            "duplicate_groups": sum(1 for n in counts.values() if n > 1),
            "near_duplicate_pairs": len(near_pairs(list(hashes.values()))),
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "class"
    return frame
