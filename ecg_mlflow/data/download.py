"""Downloading the Mendeley v2 archive and unpacking it into the class-folder layout.

The archive's inner layout is not ours to rely on (a top folder, nested zips, macOS
`__MACOSX` debris), so the four class folders are looked for wherever they are.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

import requests

from ecg_mlflow.data.classes import CLASSES, UnknownClassFolder, class_for_folder
from ecg_mlflow.data.manifest import DatasetError, is_image_name, is_stray
from ecg_mlflow.data.mendeley import MENDELEY_URL, Verification, verify

MAX_NESTING = 3
_CHUNK = 1 << 20
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(RuntimeError):
    """The archive could not be fetched or unpacked; the message says what to do instead."""


def _advice(url: str) -> str:
    return (
        f"download {url} manually (a browser works), unzip it, put the four class folders "
        "into one folder and run `ecg-mlflow data verify FOLDER`"
    )


def fetch(
    url: str, target: Path, *, attempts: int = 4, backoff_s: float = 2.0, timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Stream `url` into `target`, retrying network errors and 5xx answers with exponential backoff."""
    from tqdm import tqdm

    last = ""
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                if response.status_code >= 400:
                    last = f"HTTP {response.status_code} {response.reason}"
                    if response.status_code not in _RETRY_STATUS:
                        break
                else:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with open(target, "wb") as out, tqdm(
                        total=total, unit="B", unit_scale=True, desc="download", disable=not progress
                    ) as bar:
                        for chunk in response.iter_content(_CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                    if total is not None and target.stat().st_size != total:
                        raise requests.ConnectionError(
                            f"connection closed after {target.stat().st_size} of {total} bytes"
                        )
                    return target
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise DownloadError(f"could not download {url} after {attempt} attempt(s) ({last}); {_advice(url)}")


def safe_extract(archive: Path, into: Path) -> None:
    """Extract a zip, refusing members that would land outside `into` (zip-slip)."""
    base = into.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (base / member.filename).resolve()
                if not target.is_relative_to(base):
                    raise DownloadError(f"{archive.name}: member {member.filename!r} points outside the archive folder; refusing it")
            zf.extractall(base)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive.name} is not a valid zip archive ({exc})") from exc


def extract_all(archive: Path, into: Path) -> None:
    """Extract `archive`, then any zips found inside it (up to MAX_NESTING levels)."""
    safe_extract(archive, into)
    for _ in range(MAX_NESTING):
        inner = [p for p in into.rglob("*.zip") if p.is_file() and "__MACOSX" not in p.parts]
        if not inner:
            return
        for zipped in inner:
            safe_extract(zipped, zipped.with_suffix(""))
            zipped.unlink()


def find_class_folders(tree: Path) -> dict[str, Path]:
    """The folder of every class inside `tree`, wherever it lies; all four must be there, once."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in tree.rglob("*") if p.is_dir()):
        if "__MACOSX" in folder.parts or any(is_stray(part) for part in folder.relative_to(tree).parts):
            continue
        try:
            label = class_for_folder(folder.name)
        except UnknownClassFolder:
            continue
        if any(is_image_name(f.name) and not is_stray(f.name) for f in folder.iterdir()):
            found.setdefault(label, []).append(folder)
    problems = [f"no folder with images for class {c}" for c in CLASSES if c not in found]
    problems += [
        f"class {c} found in several folders: {', '.join(str(p.relative_to(tree)) for p in ps)}"
        for c, ps in found.items() if len(ps) > 1
    ]
    if problems:
        raise DownloadError("the archive does not hold the dataset's class folders: " + "; ".join(problems))
    return {c: found[c][0] for c in CLASSES}


def download_dataset(
    dest: str | Path, url: str = MENDELEY_URL, *, attempts: int = 4, backoff_s: float = 2.0,
    progress: bool = True,
) -> Verification:
    """Download, unpack into `dest` (class folders under their published names) and verify."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / ".download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        archive = fetch(url, work / "archive.zip", attempts=attempts, backoff_s=backoff_s, progress=progress)
        extract_all(archive, work / "unpacked")
        folders = find_class_folders(work / "unpacked")
        clashes = [f.name for f in folders.values() if (dest / f.name).exists()]
        if clashes:
            raise DatasetError(f"{dest} already has {', '.join(clashes)}: download into an empty folder")
        for folder in folders.values():
            shutil.move(str(folder), str(dest / folder.name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return verify(dest)
