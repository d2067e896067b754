"""Manifests and `data describe`: real counts, near duplicates, layout errors, bad files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from ecg_mlflow.cli import main
from ecg_mlflow.data.manifest import DatasetError, Manifest, build_manifest, describe
from ecg_mlflow.data.hashing import NEAR_DUPLICATE_DISTANCE, hash_distance
from ecg_mlflow.data.splits import duplicate_groups

MI_FOLDER = "ECG Images of Myocardial Infarction Patients (240x12=2880)"
README_FIGURES = {"MI": (239, 30), "HMI": (172, 86), "AHB": (233, 233), "NORM": (284, 142)}


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _tiny_dataset(root: Path, folders: tuple[str, ...] = ("MI", "HMI", "AHB", "NORM")) -> Path:
    for k, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.jpg").write_bytes(_jpeg((40 * k, 80, 120)))
        (root / folder / "b.png").write_bytes(_png(Image.new("L", (64, 48), 30 * k)))
    return root


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_describe_real_dataset_matches_readme(real_images: Path) -> None:
    result = CliRunner().invoke(main, ["data", "describe", str(real_images), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    classes = report["classes"]
    for label, (files, unique) in README_FIGURES.items():
        assert (classes[label]["files"], classes[label]["unique"]) == (files, unique), label
        # every duplicated content in the real set is a plain twin group; AHB has none
        assert classes[label]["duplicate_groups"] == (0 if label == "AHB" else unique), label
    assert (classes["total"]["files"], classes["total"]["unique"]) == (928, 491)
    # the real twins are byte-identical: no further near-duplicate report pairs exist
    assert classes["total"]["near_duplicate_pairs"] == 0
    assert report["ignored"] == 0 and report["bad"] == []
    assert len(report["digest"]) == 64


def test_describe_table_output(tmp_path: Path) -> None:
    root = _tiny_dataset(tmp_path / "d")
    (root / ".DS_Store").write_bytes(b"junk")
    result = CliRunner().invoke(main, ["data", "describe", str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "near_duplicate_pairs" in result.output
    assert "ignored stray files: 1" in result.output
    assert f"digest: {build_manifest(root).digest}" in result.output


def test_records_describe_the_files(real_originals: Path) -> None:
    manifest = build_manifest(real_originals, progress=True)
    assert len(manifest.records) == 8
    assert [r.relpath for r in manifest.records] == sorted(r.relpath for r in manifest.records)
    record = manifest.records[0]
    data = manifest.path_of(record).read_bytes()
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert (record.width, record.height, record.nbytes) == (2213, 1572, len(data))
    assert record.relpath == f"{MI_FOLDER}/MI(1).jpg" and record.label == "MI"
    frame = manifest.to_frame()
    assert list(frame.columns) == ["relpath", "label", "sha256", "dhash", "width", "height", "nbytes"]
    assert len(frame) == 8
    expected = hashlib.sha256(
        "".join(sorted(f"{r.relpath}\t{r.label}\t{r.sha256}\n" for r in manifest.records)).encode()
    ).hexdigest()
    assert manifest.digest == expected
    sub = manifest.subset([record.relpath])
    assert isinstance(sub, Manifest) and sub.records == (record,)
    with pytest.raises(DatasetError, match="nope.jpg"):
        manifest.subset(["nope.jpg"])


def test_reencoded_and_resized_copies_are_near_duplicates(real_images: Path, real_originals: Path, tmp_path: Path) -> None:
    """A real original, its half-size copy from ecg-images, a quality-60 re-encode of it:
    one report. A different real report is not near any of them."""
    folder = tmp_path / "d" / "MI"
    folder.mkdir(parents=True)
    original = real_originals / MI_FOLDER / "MI(1).jpg"
    shutil.copy(original, folder / "original.jpg")
    shutil.copy(real_images / MI_FOLDER / "MI(1).jpg", folder / "half_size.jpg")
    buf = io.BytesIO()
    Image.open(original).save(buf, "JPEG", quality=60)
    (folder / "quality60.jpg").write_bytes(buf.getvalue())
    shutil.copy(real_originals / MI_FOLDER / "MI(10).jpg", folder / "other_report.jpg")
    manifest = build_manifest(tmp_path / "d")
    look = {Path(r.relpath).stem: r.dhash for r in manifest.records}
    for copy in ("half_size", "quality60"):
        assert hash_distance(look["original"], look[copy]) <= NEAR_DUPLICATE_DISTANCE, copy
    for name in ("original", "half_size", "quality60"):
        assert hash_distance(look["other_report"], look[name]) > NEAR_DUPLICATE_DISTANCE, name
    assert describe(manifest).loc["MI", "near_duplicate_pairs"] == 3
    assert describe(manifest).loc["MI", "unique"] == 4
    assert [len(g) for g in duplicate_groups(manifest)] == [3, 1]


def test_short_folder_names_and_stray_files(tmp_path: Path) -> None:
    root = _tiny_dataset(tmp_path / "d", ("mi", "HMI", "AHB", "Normal Person ECG Images (284x12=3408)"))
    (root / ".DS_Store").write_bytes(b"x")
    (root / "Thumbs.db").write_bytes(b"x")
    (root / "mi" / "desktop.ini").write_bytes(b"x")
    (root / "mi" / ".hidden.jpg").write_bytes(b"x")
    (root / "AHB" / "notes.txt").write_text("not an image")
    manifest = build_manifest(root)
    assert manifest.n_ignored == 5
    assert {r.label for r in manifest.records} == {"MI", "HMI", "AHB", "NORM"}
    assert len(manifest.records) == 8


def test_layout_errors_are_named_together(tmp_path: Path) -> None:
    root = _tiny_dataset(tmp_path / "d")
    (root / "Cats").mkdir()
    (root / "Cats" / "c.jpg").write_bytes(_jpeg((1, 2, 3)))
    (root / "NORM" / "sub").mkdir()
    (root / "loose.jpg").write_bytes(_jpeg((1, 2, 3)))
    shutil.rmtree(root / "HMI")
    (root / "HMI").mkdir()
    (root / "HMI" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DatasetError) as info:
        build_manifest(root)
    message = str(info.value)
    for culprit in ("'Cats'", "'HMI' has no images", "loose.jpg", "NORM/sub"):
        assert culprit in message


def test_missing_folder_and_no_class_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        build_manifest(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        build_manifest(tmp_path / "empty")


def test_bad_files_reported_at_once_or_skipped(real_originals: Path, tmp_path: Path) -> None:
    root = _tiny_dataset(tmp_path / "d")
    data = (real_originals / MI_FOLDER / "MI(1).jpg").read_bytes()
    (root / "MI" / "zero.jpg").write_bytes(b"")
    (root / "MI" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "HMI" / "text.jpg").write_text("hello, I am not a JPEG")
    (root / "AHB" / "deep.png").write_bytes(_png(Image.new("I;16", (8, 8))))
    bad = {"MI/zero.jpg": "empty", "MI/truncated.jpg": "truncated", "HMI/text.jpg": "not an image",
           "AHB/deep.png": "unsupported image mode"}
    with pytest.raises(DatasetError) as info:
        build_manifest(root)
    for relpath, reason in bad.items():
        line = next(line for line in str(info.value).splitlines() if relpath in line)
        assert reason in line, line
    manifest = build_manifest(root, skip_bad=True)
    assert len(manifest.records) == 8
    assert {p for p, _ in manifest.bad} == set(bad)
    result = CliRunner().invoke(main, ["data", "describe", str(root), "--skip-bad", "--no-progress"])
    assert result.exit_code == 0 and "bad images excluded: 4" in result.output
    result = CliRunner().invoke(main, ["data", "describe", str(root), "--no-progress"])
    assert result.exit_code == 1 and "MI/zero.jpg" in result.output and "--skip-bad" in result.output


def test_symlink_outside_dataset_is_refused(tmp_path: Path) -> None:
    root = _tiny_dataset(tmp_path / "d")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg((9, 9, 9)))
    os.symlink(secret, root / "MI" / "link.jpg")
    os.symlink(root / "MI" / "a.jpg", root / "HMI" / "inside.jpg")  # inside the dataset: fine
    with pytest.raises(DatasetError, match=r"MI/link\.jpg: symlink to .*outside the dataset folder"):
        build_manifest(root)
    (root / "MI" / "link.jpg").unlink()
    manifest = build_manifest(root)
    assert "HMI/inside.jpg" in {r.relpath for r in manifest.records}


def test_help_on_every_data_command() -> None:
    for args in (["data"], ["data", "describe"], ["data", "verify"], ["data", "download"]):
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, args
