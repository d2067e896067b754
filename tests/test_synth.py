"""Synthetic ECG reports: the beat model's physiology, the rendered page, the dataset writer, the CLI."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import PROJECT_ROOT
from ecg_mlflow.synth.beats import (
    LEAD_INDEX,
    LEADS,
    TERRITORIES,
    T,
    acute_mi,
    af_rhythm,
    beat_template,
    normal_morphology,
    old_mi,
    pvc_morphology,
    pvc_rhythm,
    render_beats,
    sinus_rhythm,
    synthesize_ecg,
)
from ecg_mlflow.data.classes import CLASSES, MENDELEY_FOLDERS
from ecg_mlflow.cli import main
from ecg_mlflow.data.preprocess import GRID_BOX
from ecg_mlflow.synth.reports import (
    CLASS_FOLDERS,
    FILE_PREFIXES,
    ROW_BASELINES_MM,
    GRID_MM,
    write_synthetic_dataset,
)

SMALL = {"width": 442, "height": 314}
SEEDS = range(12)


# ---- the beat model -------------------------------------------------------------------


def st_level(t: np.ndarray, signals: np.ndarray) -> np.ndarray:
    """ST level per lead at J + 60 ms (R peak + 80 ms) against the zero baseline of a template."""
    return signals[:, np.argmin(np.abs(t - 0.08))]


def q_depth(t: np.ndarray, signals: np.ndarray) -> np.ndarray:
    """Most negative value per lead in the 70 ms before the R peak."""
    return signals[:, (t > -0.07) & (t < -0.01)].min(axis=1)


def half_max_width(t: np.ndarray, x: np.ndarray) -> float:
    """Width (s) of the deflection around the largest peak of `x`, at half its height."""
    i = int(np.argmax(np.abs(x)))
    peak, lo, hi = x[i], i, i
    while lo > 0 and x[lo - 1] * np.sign(peak) >= abs(peak) / 2:
        lo -= 1
    while hi < len(x) - 1 and x[hi + 1] * np.sign(peak) >= abs(peak) / 2:
        hi += 1
    return float(t[hi] - t[lo])


def territory_mask(territory: str) -> np.ndarray:
    return np.isin(LEADS, TERRITORIES[territory])


@pytest.mark.parametrize("territory", sorted(TERRITORIES))
def test_acute_mi_elevates_st_and_digs_q_waves_in_its_territory(territory):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        normal = normal_morphology(rng)
        t, signals = beat_template(acute_mi(normal, territory, rng))
        inside = territory_mask(territory)
        assert (st_level(t, signals)[inside] > 0.12).all()
        assert (q_depth(t, signals)[inside] < -0.2).all()
        t0, healthy = beat_template(normal)
        assert (st_level(t0, healthy) <= 0.06).all()  # the same heart before: benign V2-V3 at most


@pytest.mark.parametrize("territory", sorted(TERRITORIES))
def test_old_mi_has_q_waves_and_inverted_t_but_no_st_elevation(territory):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        morph = old_mi(normal_morphology(rng), territory, rng)
        t, signals = beat_template(morph)
        inside = territory_mask(territory)
        assert (q_depth(t, signals)[inside] < -0.2).all()
        t_peak = signals[:, np.argmin(np.abs(t - morph.centers[T]))]
        assert (t_peak[inside] < -0.1).all()
        assert (st_level(t, signals)[inside] <= 0.0).all()
        assert (st_level(t, signals) <= 0.06).all()  # nowhere elevated beyond benign V2-V3 (<= 0.05 mV)


def test_normal_sinus_rhythm_is_regular_with_p_waves():
    for seed in SEEDS:
        record = synthesize_ecg("NORM", np.random.default_rng(seed), artifacts=False)
        rr = record.rhythm.rr
        assert rr.std() / rr.mean() < 0.06
        assert 55 <= record.rate_bpm <= 105
        assert record.rhythm.has_p and not record.rhythm.is_pvc.any()
        t, beat = beat_template(record.morphology)
        p_time = record.morphology.centers[0]
        assert beat[LEAD_INDEX["II"], np.argmin(np.abs(t - p_time))] > 0.05  # an upright P in II


def test_atrial_fibrillation_is_irregular_without_p_waves():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        rhythm = af_rhythm(rng, rate_bpm=rng.uniform(75, 140))
        assert rhythm.rr.std() / rhythm.rr.mean() > 0.12
        assert not rhythm.has_p and rhythm.fibrillation_mv > 0
        morph = normal_morphology(rng)
        without_p = morph.amplitudes.copy()
        without_p[0] = 0.0
        no_p_morph = type(morph)(without_p, morph.centers, morph.widths, morph.st)
        # Rendering the rhythm draws no P wave at all: zeroing P amplitudes changes nothing.
        np.testing.assert_array_equal(render_beats(morph, rhythm), render_beats(no_p_morph, rhythm))
        sinus = sinus_rhythm(rng, rate_bpm=80)
        assert not np.array_equal(render_beats(morph, sinus), render_beats(no_p_morph, sinus))


def test_pvcs_come_early_are_wide_and_leave_a_compensatory_pause():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        rate = rng.uniform(60, 100)
        rhythm = pvc_rhythm(rng, rate_bpm=rate)
        sinus_rr = 60 / rate
        visible = (rhythm.r_times > 0.5) & (rhythm.r_times < 9.5)
        assert (rhythm.is_pvc & visible).any()
        for i in np.flatnonzero(rhythm.is_pvc):
            coupling = rhythm.r_times[i] - rhythm.r_times[i - 1]
            assert coupling < 0.75 * sinus_rr
            if i + 1 < len(rhythm.r_times):
                around = rhythm.r_times[i + 1] - rhythm.r_times[i - 1]
                assert around == pytest.approx(2 * sinus_rr, rel=0.05)
        pvc, normal = pvc_morphology(rng), normal_morphology(rng)
        qrs = slice(int(0.3 * 500), int(0.55 * 500))  # -0.1 .. +0.15 s around the R peak
        t, wide = beat_template(pvc)
        _, narrow = beat_template(normal)
        widest = np.argmax(np.abs(pvc.amplitudes[2]))
        tallest = np.argmax(np.abs(normal.amplitudes[2]))
        assert half_max_width(t[qrs], wide[widest, qrs]) > 0.05
        assert half_max_width(t[qrs], narrow[tallest, qrs]) < 0.035


def test_abnormal_heartbeat_picks_af_or_pvcs_per_image():
    rhythms = {synthesize_ecg("AHB", np.random.default_rng(seed)).rhythm.name for seed in range(16)}
    assert rhythms == {"af", "sinus+pvc"}


def test_infarct_territory_is_chosen_per_image():
    territories = {synthesize_ecg("MI", np.random.default_rng(seed)).territory for seed in range(16)}
    assert territories == set(TERRITORIES)
    assert synthesize_ecg("NORM", np.random.default_rng(0)).territory is None


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown class 'STEMI'"):
        synthesize_ecg("STEMI", np.random.default_rng(0))


# ---- the dataset writer ---------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small"
    write_synthetic_dataset(out, per_class=4, seed=7, **SMALL)
    return out


def test_layout_is_the_mendeley_layout(small_set):
    assert sorted(p.name for p in small_set.iterdir()) == sorted(MENDELEY_FOLDERS)
    for cls in CLASSES:
        names = sorted(p.name for p in (small_set / CLASS_FOLDERS[cls]).iterdir())
        assert names == sorted(f"{FILE_PREFIXES[cls]}({n}).jpg" for n in range(1, 5))
    assert (small_set / CLASS_FOLDERS["HMI"] / "PMI(1).jpg").is_file()
    assert (small_set / CLASS_FOLDERS["AHB"] / "HB(4).jpg").is_file()
    assert (small_set / CLASS_FOLDERS["NORM"] / "Normal(2).jpg").is_file()


def test_images_are_rgb_jpegs_of_the_asked_size(small_set):
    for path in small_set.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (SMALL["width"], SMALL["height"])
            image.load()


def test_same_seed_same_bytes_other_seed_other_images(small_set, tmp_path):
    again = tmp_path / "again"
    write_synthetic_dataset(again, per_class=4, seed=7, **SMALL)
    assert all_bytes(again) == all_bytes(small_set)
    other = tmp_path / "other"
    write_synthetic_dataset(other, per_class=4, seed=8, **SMALL)
    theirs, ours = all_bytes(other), all_bytes(small_set)
    assert theirs.keys() == ours.keys()
    assert all(theirs[name] != ours[name] for name in ours)


def test_all_images_differ_without_duplicates(small_set):
    digests = [sha256_of(p) for p in small_set.rglob("*.jpg")]
    assert len(set(digests)) == len(digests) == 16


def test_duplicates_plant_exact_copies_like_the_real_set(tmp_path):
    summary = write_synthetic_dataset(tmp_path / "dup", per_class=10, seed=3, duplicates=0.4, **SMALL)
    assert summary.files == {cls: 10 for cls in CLASSES}
    assert summary.unique == {cls: 6 for cls in CLASSES}
    all_digests = set()
    for cls in CLASSES:
        folder = tmp_path / "dup" / CLASS_FOLDERS[cls]
        digest = {n: sha256_of(folder / f"{FILE_PREFIXES[cls]}({n}).jpg") for n in range(1, 11)}
        assert len(set(digest.values())) == 6
        for n in range(7, 11):
            assert digest[n] == digest[n - 6]  # file n + u is a copy of file n
        all_digests |= set(digest.values())
    assert len(all_digests) == 24  # no copy crosses a class


def test_duplicates_always_leave_one_unique_image(tmp_path):
    summary = write_synthetic_dataset(tmp_path / "d", per_class=3, seed=0, duplicates=0.99, **SMALL)
    assert summary.unique == {cls: 1 for cls in CLASSES}
    folder = tmp_path / "d" / CLASS_FOLDERS["MI"]
    assert len({sha256_of(p) for p in folder.iterdir()}) == 1


def test_first_images_do_not_depend_on_per_class(small_set, tmp_path):
    bigger = tmp_path / "bigger"
    write_synthetic_dataset(bigger, per_class=5, seed=7, **SMALL)
    ours, theirs = all_bytes(small_set), all_bytes(bigger)
    assert all(theirs[name] == data for name, data in ours.items())


def test_previous_output_is_replaced_but_foreign_files_are_refused(tmp_path):
    out = tmp_path / "set"
    write_synthetic_dataset(out, per_class=3, seed=1, **SMALL)
    write_synthetic_dataset(out, per_class=2, seed=2, **SMALL)  # a rerun replaces it
    assert len(list(out.rglob("*.jpg"))) == 8

    foreign = out / CLASS_FOLDERS["NORM"] / "Normal(9).jpg"
    Image.new("RGB", (10, 10), "white").save(foreign)
    with pytest.raises(ValueError, match=r"Normal\(9\)\.jpg.*which synth did not write"):
        write_synthetic_dataset(out, per_class=2, seed=2, **SMALL)
    assert foreign.exists() and len(list(out.rglob("*.jpg"))) == 9  # nothing was deleted

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="'todo.txt' is not one of its class folders"):
        write_synthetic_dataset(notes, per_class=1, seed=0, **SMALL)


def test_real_dataset_is_never_overwritten(real_originals, tmp_path):
    """Aimed at a copy of the real originals, never at the shared data itself: if the guard
    regressed, only the copy would be lost (and the test would say so)."""
    copy = tmp_path / "originals-copy"
    shutil.copytree(real_originals, copy)
    before = {p.relative_to(copy): sha256_of(p) for p in copy.rglob("*") if p.is_file()}
    assert before == {p.relative_to(real_originals): sha256_of(p) for p in real_originals.rglob("*") if p.is_file()}
    assert len(before) == 8  # two originals per class
    with pytest.raises(ValueError, match="which synth did not write"):
        write_synthetic_dataset(copy, per_class=1, seed=0, **SMALL)
    after = {p.relative_to(copy): sha256_of(p) for p in copy.rglob("*") if p.is_file()}
    assert after == before  # nothing written, replaced or deleted; no marker left either
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in real_originals.iterdir())


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("per_class", 0, "per_class must be a positive integer"),
        ("per_class", 2.5, "per_class must be a positive integer"),
        ("seed", -1, "seed must be a non-negative integer"),
        ("width", 100, "width must be an integer from"),
        ("height", 10**5, "height must be an integer from"),
        ("duplicates", 1.0, "duplicates must be a fraction"),
        ("duplicates", -0.1, "duplicates must be a fraction"),
    ],
)
def test_bad_arguments_are_named(tmp_path, argument, value, message):
    kwargs = {"per_class": 1, "seed": 0, **SMALL, argument: value}
    with pytest.raises(ValueError, match=message):
        write_synthetic_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# ---- the rendered page ----------------------------------------------------------------


def grid_box_px(width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = GRID_BOX
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def is_dark(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=-1) < 100


def is_ink(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=-1) < 160


def is_pink(pixels: np.ndarray) -> np.ndarray:
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > 200) & (r - g > 25) & (r - b > 25)


def check_page(pixels: np.ndarray) -> None:
    """A light page, a pink grid with dark traces in all four rows, text above and below."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = grid_box_px(width, height)
    inset = round(0.015 * width)  # more than the 2 mm the whole drawing may shift
    grid = pixels[y0 + inset : y1 - inset, x0 + inset : x1 - inset]
    assert np.median(pixels.reshape(-1, 3), axis=0).min() > 240  # white/very light page
    assert is_pink(grid).mean() > 0.05  # grid lines cover a good part of the box
    mm = (y1 - y0) / GRID_MM[1]
    for baseline_mm in ROW_BASELINES_MM:
        band = pixels[round(y0 + (baseline_mm - 8) * mm) : round(y0 + (baseline_mm + 8) * mm), x0:x1]
        assert is_dark(band).sum() > 2 * (x1 - x0) * 0.5  # a trace crosses the whole row
    header, footer = pixels[: y0 - inset], pixels[y1 + inset :]
    assert is_ink(header).sum() > 100
    assert is_ink(pixels[y1 + 2 :]).sum() > 50  # small fonts print grey, not black
    assert not is_pink(header).any() and not is_pink(footer).any()  # the grid stays in its box


def test_small_pages_look_like_reports(small_set):
    for path in sorted(small_set.rglob("*.jpg")):
        check_page(np.asarray(Image.open(path).convert("RGB")))


def test_default_size_page_and_crop_grid(tmp_path):
    from ecg_mlflow.data.preprocess import crop_box, load_pixels

    summary = write_synthetic_dataset(tmp_path / "full", per_class=1, seed=11)
    for cls in CLASSES:
        path = summary.out / CLASS_FOLDERS[cls] / f"{FILE_PREFIXES[cls]}(1).jpg"
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (1572, 2213, 3)
        check_page(pixels)
        # crop=grid keeps the traces and drops the printed text.
        left, top, right, bottom = crop_box((2213, 1572), "grid")
        cropped = load_pixels(path, 1572 // 4, 2213 // 4, crop="grid")
        assert is_dark(cropped).mean() > 0.01
        assert is_dark(pixels[:top - 20]).sum() > 1000  # header text above the crop
        assert is_dark(pixels[bottom + 20 :]).sum() > 200  # footer text below it


# ---- the command ----------------------------------------------------------------------


def test_cli_writes_and_summarises(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main,
        ["synth", "--out", str(out), "--per-class", "3", "--seed", "5", "--width", "442",
         "--height", "314", "--duplicates", "0.34", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    for cls in CLASSES:
        assert any(line.split()[:5] == [cls, "3", "files", "2", "unique"] for line in result.output.splitlines())
    assert len(list(out.rglob("*.jpg"))) == 12


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--per-class", "abc", "--per-class must be an integer, got 'abc'"),
        ("--per-class", "0", "--per-class must be at least 1, got 0"),
        ("--seed", "1.5", "--seed must be an integer, got '1.5'"),
        ("--width", "10", "--width must be an integer from 256 to 8852, got '10'"),
        ("--height", "tall", "--height must be an integer from 182 to 6288, got 'tall'"),
        ("--duplicates", "half", "--duplicates must be a number, got 'half'"),
        ("--duplicates", "nan", "--duplicates must lie in [0.0, 1.0), got 'nan'"),
    ],
)
def test_cli_bad_parameter_is_one_line_naming_it(tmp_path, option, value, message):
    args = {"--out": str(tmp_path / "o"), "--per-class": "1", "--seed": "0", "--width": "442",
            "--height": "314", "--duplicates": "0", option: value}
    result = CliRunner().invoke(main, ["synth", *[x for pair in args.items() for x in pair]])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {message}"
    assert not (tmp_path / "o").exists()


def test_mlproject_synth_entry_point_command_runs(tmp_path):
    """The MLproject's own `synth` command line, parameters substituted as strings as MLflow does."""
    entry = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]["synth"]
    out = tmp_path / "mlproject"
    params = {"out": str(out), "per_class": "1", "seed": "0", "width": "442", "height": "314", "duplicates": "0.0"}
    assert set(params) == set(entry["parameters"])
    command = shlex.split(entry["command"].format(**{k: shlex.quote(v) for k, v in params.items()}))
    assert command[:3] == ["python", "-m", "ecg_mlflow"]
    command[0] = sys.executable
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 synthetic ECG reports" in done.stdout
    assert len(list(out.rglob("*.jpg"))) == 4
    params["duplicates"] = "2"
    bad = shlex.split(entry["command"].format(**{k: shlex.quote(v) for k, v in params.items()}))
    refused = subprocess.run([sys.executable, *bad[1:]], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "Error: --duplicates must lie in [0.0, 1.0), got '2'"


# ---- the dataset layer reads it -------------------------------------------------------


def test_dataset_layer_reads_the_synthetic_set(tmp_path):
    from ecg_mlflow.data.manifest import build_manifest, describe

    write_synthetic_dataset(tmp_path / "set", per_class=6, seed=4, duplicates=0.5, **SMALL)
    manifest = build_manifest(tmp_path / "set")
    assert manifest.n_ignored == 0 and not manifest.bad
    by_class = {cls: [r for r in manifest.records if r.label == cls] for cls in CLASSES}
    for cls, records in by_class.items():
        assert len(records) == 6
        assert all(r.relpath.startswith(CLASS_FOLDERS[cls] + "/") for r in records)
        assert all((r.width, r.height) == (442, 314) for r in records)
    table = describe(manifest)
    assert table.loc["total", "files"] == 24
    assert table.loc["total", "unique"] == 12
    assert (table.loc[list(CLASSES), "duplicate_groups"] == 3).all()
