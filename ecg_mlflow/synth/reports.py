"""Synthetic 12-lead ECG reports, written as a dataset in the Mendeley folder layout.

The pages imitate the real reports of Mendeley gwbz3fsgp8 (2213 x 1572 at 200 dpi): a
printed header, a pink millimetre grid holding 3 x 4 leads of 2.5 s and a 10 s lead II
rhythm strip, and a footer with the recording settings and the heart rate. The grid lies in
the same fractional box as on the real pages, so `crop=grid` keeps the traces and drops the
text. The traces come from `ecg_mlflow.synth.beats`; `make demo` and the tests run on this data
offline.

Every unique image is drawn from its own generator seeded by (seed, class, index), so a
seed gives byte-identical files and the first images do not change when `per_class` grows.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecg_mlflow.synth.beats import LEAD_INDEX, EcgRecord, synthesize_ecg
from ecg_mlflow.data.classes import CLASSES, MENDELEY_FOLDERS
from ecg_mlflow.data.preprocess import crop_box

DEFAULT_WIDTH = 2213
DEFAULT_HEIGHT = 1572
MIN_WIDTH, MIN_HEIGHT = 256, 182
MAX_WIDTH, MAX_HEIGHT = 8852, 6288  # 4x the real page; beyond that nobody means it
JPEG_QUALITY = 90
SYNTH_COMMENT = b"ecg-mlflow synthetic ECG report"
"""JPEG comment in every file we write: how a later run recognises output it may replace."""

CLASS_FOLDERS: dict[str, str] = {cls: folder for folder, cls in MENDELEY_FOLDERS.items()}
FILE_PREFIXES: dict[str, str] = {"MI": "MI", "HMI": "PMI", "AHB": "HB", "NORM": "Normal"}
"""File name stems of the real set: `MI(1).jpg`, `PMI(1).jpg`, `HB(1).jpg`, `Normal(1).jpg`."""

GRID_MM = (266.8, 155.8)
"""Size of the trace grid (preprocess.GRID_BOX, where `crop=grid` cuts) in millimetres at
200 dpi (7.874 px/mm on a 2213 x 1572 page)."""

# Layout inside the grid box, in mm from its top-left corner.
ROWS: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
RHYTHM_LEAD = "II"
ROW_BASELINES_MM = (23.3, 60.8, 98.4, 137.0)  # three lead rows, then the rhythm strip
TRACE_X0_MM = 11.0
CALIBRATION_X0_MM = 4.0
COLUMN_S = 2.5
PAPER_SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0

PAGE_COLOUR = (252, 251, 249)
MINOR_COLOUR = (250, 225, 225)
MAJOR_COLOUR = (240, 172, 172)
INK = (12, 12, 12)


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_dataset` wrote: files and unique images per class."""

    out: Path
    files: dict[str, int]
    unique: dict[str, int]

    @property
    def total_files(self) -> int:
        return sum(self.files.values())


@dataclass(frozen=True)
class _PageGeometry:
    """Pixel scale of one page size: the grid box and millimetres in pixels."""

    width: int
    height: int
    box: tuple[int, int, int, int]
    mm_x: float
    mm_y: float

    @classmethod
    def of(cls, width: int, height: int) -> _PageGeometry:
        x0, y0, x1, y1 = crop_box((width, height), "grid")
        return cls(width, height, (x0, y0, x1, y1), (x1 - x0) / GRID_MM[0], (y1 - y0) / GRID_MM[1])

    @property
    def margin(self) -> int:
        """Room around the cached page so the whole drawing can shift by up to 2 mm."""
        return int(np.ceil(2 * max(self.mm_x, self.mm_y))) + 1


@functools.lru_cache(maxsize=4)
def _grid_page(width: int, height: int) -> np.ndarray:
    """The blank page with its grid, `margin` pixels larger on every side (drawn once per size)."""
    geo = _PageGeometry.of(width, height)
    m = geo.margin
    page = np.empty((height + 2 * m, width + 2 * m, 3), dtype=np.uint8)
    page[:] = PAGE_COLOUR
    x0, y0, x1, y1 = (v + m for v in geo.box)
    major = max(1, round(geo.mm_x / 4))
    for step_mm, colour, line in ((1, MINOR_COLOUR, 1), (5, MAJOR_COLOUR, major)):
        if geo.mm_x * step_mm < 3.0:
            continue  # minor lines closer than 3 px would just tint the page
        for x in np.arange(x0, x1 + 1, geo.mm_x * step_mm):
            page[y0 : y1 + 1, int(round(x)) : int(round(x)) + line] = colour
        for y in np.arange(y0, y1 + 1, geo.mm_y * step_mm):
            page[int(round(y)) : int(round(y)) + line, x0 : x1 + 1] = colour
    border = max(1, round(geo.mm_x / 3))
    page[y0 : y0 + border, x0 : x1 + 1] = MAJOR_COLOUR
    page[y1 - border + 1 : y1 + 1, x0 : x1 + 1] = MAJOR_COLOUR
    page[y0 : y1 + 1, x0 : x0 + border] = MAJOR_COLOUR
    page[y0 : y1 + 1, x1 - border + 1 : x1 + 1] = MAJOR_COLOUR
    page.setflags(write=False)
    return page


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, size))


def _header_lines(rng: np.random.Generator, record: EcgRecord) -> tuple[list[str], str, str]:
    """Header lines, footer settings and footer date: patient-like, unrelated to the class."""
    exam_id = int(rng.integers(100000, 999999))
    age = int(rng.integers(25, 85))
    sex = "Male" if rng.random() < 0.6 else "Female"
    header = [
        f"ID : {exam_id}      {age} Years      {sex}      cm      kg      /      mmHg      "
        "Race:Unknown      Room No.:      Department:",
        "Exam.Room:      Medication:",
    ]
    settings = (
        f"0.67~25Hz  AC50  25mm/s  10mm/mV  4*2.5s+1r  HR {round(record.rate_bpm)}bpm  "
        "SE-3 V1.0  SEMIP V1.7"
    )
    day = np.datetime64("2019-01-01") + int(rng.integers(0, 3 * 365))
    seconds = int(rng.integers(0, 24 * 3600))
    hour, minute, second = seconds // 3600, seconds // 60 % 60, seconds % 60
    date = f"{day}  {(hour - 1) % 12 + 1:02d}:{minute:02d}:{second:02d} {'AM' if hour < 12 else 'PM'}"
    return header, settings, date


def _draw_text(
    draw: ImageDraw.ImageDraw, geo: _PageGeometry, dx: int, dy: int, rng: np.random.Generator, record: EcgRecord
) -> None:
    """Title, patient lines, double rule and signature block above the grid; footer below."""
    w, h = geo.width, geo.height
    body, title = _font(round(0.0165 * h)), _font(round(0.026 * h))
    header, settings, date = _header_lines(rng, record)
    draw.text((w / 2 + dx, 0.028 * h + dy), "ECG REPORT", font=title, fill=INK, anchor="mm")
    left = 0.016 * w + dx
    draw.text((left, 0.047 * h + dy), header[0], font=body, fill=INK)
    draw.text((left, 0.068 * h + dy), header[1], font=body, fill=INK)
    rule = max(1, round(geo.mm_y / 4))
    for y in (0.087 * h, 0.092 * h):
        draw.line([(left, y + dy), (0.975 * w + dx, y + dy)], fill=INK, width=rule)
    draw.text((left, 0.097 * h + dy), "Diagnosis Information:", font=body, fill=INK)
    for i, label in enumerate(("Technician :", "Ref-Phys. :", "Report Confirmed by:")):
        draw.text((0.703 * w + dx, (0.118 + 0.021 * i) * h + dy), label, font=body, fill=INK)
    footer_y = 0.983 * h + dy
    draw.text((left, footer_y), settings, font=body, fill=INK, anchor="lm")
    draw.text((0.81 * w + dx, footer_y), date, font=body, fill=INK, anchor="lm")


def _draw_traces(draw: ImageDraw.ImageDraw, geo: _PageGeometry, dx: int, dy: int, record: EcgRecord) -> None:
    """Calibration pulses, the 3 x 4 lead grid (each column a successive 2.5 s), the rhythm strip."""
    x_box, y_box, x_end, y_end = geo.box
    width = max(1, round(3 * geo.width / DEFAULT_WIDTH))  # the real pages print ~3 px traces
    px_per_s = PAPER_SPEED_MM_S * geo.mm_x
    px_per_mv = GAIN_MM_MV * geo.mm_y
    label_font = _font(round(0.0165 * geo.height))
    column_samples = int(round(COLUMN_S * record.fs))

    def to_x(mm: float) -> float:
        return x_box + mm * geo.mm_x + dx

    def to_y(mm: float) -> float:
        return y_box + mm * geo.mm_y + dy

    def polyline(x0: float, baseline: float, samples: np.ndarray) -> None:
        xs = x0 + np.arange(len(samples)) * (px_per_s / record.fs)
        ys = np.clip(baseline - samples * px_per_mv, y_box + 1, y_end - 1)
        draw.line(np.column_stack([xs, ys]).ravel().tolist(), fill=INK, width=width)

    x_trace = to_x(TRACE_X0_MM)
    for row, baseline_mm in enumerate(ROW_BASELINES_MM):
        baseline = to_y(baseline_mm)
        cx = to_x(CALIBRATION_X0_MM)
        pulse = [(cx, baseline), (cx + geo.mm_x, baseline), (cx + geo.mm_x, baseline - px_per_mv),
                 (cx + 4 * geo.mm_x, baseline - px_per_mv), (cx + 4 * geo.mm_x, baseline),
                 (cx + 5 * geo.mm_x, baseline)]
        draw.line(pulse, fill=INK, width=width)
        if row == len(ROWS):
            strip = record.signals[LEAD_INDEX[RHYTHM_LEAD]]
            polyline(x_trace, baseline, strip)
            draw.text((x_trace + geo.mm_x, baseline - 4 * geo.mm_y), RHYTHM_LEAD, font=label_font, fill=INK)
            continue
        for column, lead in enumerate(ROWS[row]):
            start = column * column_samples
            x0 = x_trace + column * COLUMN_S * px_per_s
            polyline(x0, baseline, record.signals[LEAD_INDEX[lead], start : start + column_samples])
            draw.text((x0 + geo.mm_x, baseline - 4 * geo.mm_y), lead, font=label_font, fill=INK)
    for column in range(1, 4):
        x = x_trace + column * COLUMN_S * px_per_s
        top, bottom = to_y(ROW_BASELINES_MM[0] - 10), to_y(ROW_BASELINES_MM[2] + 10)
        draw.line([(x, top), (x, bottom)], fill=INK, width=width)


def render_report(record: EcgRecord, rng: np.random.Generator, *, width: int, height: int) -> Image.Image:
    """Draw one report page (RGB) of a 10 s, 12-lead `record`; `rng` picks offsets and header text."""
    geo = _PageGeometry.of(width, height)
    m = geo.margin
    shift_x = int(rng.integers(-m + 1, m))
    shift_y = int(rng.integers(-m + 1, m))
    page = _grid_page(width, height)
    # Shift the whole printout (grid included): scans and printers never align it the same.
    image = Image.fromarray(page[m - shift_y : m - shift_y + height, m - shift_x : m - shift_x + width])
    draw = ImageDraw.Draw(image)
    _draw_text(draw, geo, shift_x, shift_y, rng, record)
    _draw_traces(draw, geo, shift_x, shift_y, record)
    return image


def report_rng(seed: int, cls: str, index: int) -> np.random.Generator:
    """The generator of unique image `index` (1-based) of class `cls` under `seed`."""
    return np.random.default_rng([seed, CLASSES.index(cls), index])


def synthesize_report(cls: str, *, seed: int, index: int, width: int, height: int) -> tuple[Image.Image, EcgRecord]:
    """One report page of class `cls` and the recording drawn on it."""
    rng = report_rng(seed, cls, index)
    record = synthesize_ecg(cls, rng)
    return render_report(record, rng, width=width, height=height), record


def file_name(cls: str, number: int) -> str:
    """`file_name("HMI", 3) -> "PMI(3).jpg"`: the real set's naming."""
    return f"{FILE_PREFIXES[cls]}({number}).jpg"


def _validate(per_class: object, seed: object, width: object, height: object, duplicates: object) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(per_class) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(width) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"width must be an integer from {MIN_WIDTH} to {MAX_WIDTH}, got {width!r}")
    if not is_int(height) or not MIN_HEIGHT <= height <= MAX_HEIGHT:
        raise ValueError(f"height must be an integer from {MIN_HEIGHT} to {MAX_HEIGHT}, got {height!r}")
    if not isinstance(duplicates, (int, float)) or isinstance(duplicates, bool) or not 0.0 <= duplicates < 1.0:
        raise ValueError(f"duplicates must be a fraction from 0 to below 1, got {duplicates!r}")


def _is_synthetic(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.format == "JPEG" and image.info.get("comment") == SYNTH_COMMENT
    except OSError:
        return False


def _prepare_output(out: Path) -> None:
    """Make `out` ready: create it, or clear a previous synthetic dataset; refuse anything else.

    A previous output is recognised by its layout (only the four Mendeley class folders)
    and by the comment this module writes into every JPEG, so a real download in the same
    layout is never deleted.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True)
        return
    folders = set(CLASS_FOLDERS.values())
    for entry in sorted(out.iterdir()):
        if entry.name not in folders or not entry.is_dir():
            raise ValueError(
                f"output directory {str(out)!r} is not empty and not a synthetic dataset ({entry.name!r} is not one "
                "of its class folders); choose an empty or new directory"
            )
        for item in sorted(entry.iterdir()):
            if not item.is_file() or not _is_synthetic(item):
                raise ValueError(
                    f"output directory {str(out)!r} holds {str(item)!r}, which synth did not write; "
                    "choose an empty or new directory"
                )
    for folder in folders:
        shutil.rmtree(out / folder, ignore_errors=True)


def copies_for(per_class: int, duplicates: float) -> int:
    """How many of a class's `per_class` files are copies: round(duplicates * per_class), at least one unique."""
    return min(int(round(duplicates * per_class)), per_class - 1)


def write_synthetic_dataset(
    out: str | Path,
    *,
    per_class: int,
    seed: int,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    duplicates: float = 0.0,
    progress: bool = False,
) -> SynthSummary:
    """Write `per_class` report JPEGs per class into `out` in the Mendeley folder layout.

    Args:
        out: a new or empty directory, or a previous output of this function (replaced).
            Anything else is refused, so real data is never overwritten.
        per_class: files per class, copies included.
        seed: same seed, same bytes; another seed, other images.
        width, height: page size in pixels (the real reports are 2213 x 1572).
        duplicates: fraction of each class's files that are byte-identical copies of another
            file of the class, as in the real set: with u unique images, file n + u is a copy
            of file n. At least one image per class stays unique.
        progress: show a tqdm progress bar.

    Returns:
        The files and unique images written per class.
    """
    _validate(per_class, seed, width, height, duplicates)
    out = Path(out)
    _prepare_output(out)
    n_unique = per_class - copies_for(per_class, duplicates)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=per_class * len(CLASSES), unit="img", desc="synth")
    try:
        for cls in CLASSES:
            folder = out / CLASS_FOLDERS[cls]
            folder.mkdir()
            for number in range(1, per_class + 1):
                target = folder / file_name(cls, number)
                if number <= n_unique:
                    image, _ = synthesize_report(cls, seed=seed, index=number, width=width, height=height)
                    image.save(target, format="JPEG", quality=JPEG_QUALITY, comment=SYNTH_COMMENT)
                else:
                    shutil.copyfile(folder / file_name(cls, (number - 1) % n_unique + 1), target)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SynthSummary(
        out=out,
        files={cls: per_class for cls in CLASSES},
        unique={cls: n_unique for cls in CLASSES},
    )
