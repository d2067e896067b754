"""Scaling: time and peak memory of each stage against the number of images (1k, 10k, 100k).

Each (stage, size) runs in a fresh process, so its peak resident memory is its own. Stages:
- manifest: SHA-256 + dHash per real image (measured on real reports, times n);
- near duplicates: the multi-index search on synthetic 1024-bit hashes, spread (uniform bits)
  and layout-like (each bit with its share of ones in the real reports), against the old
  all-pairs search where it fits (up to --old-max);
- split: duplicate groups, the grouped split and the leakage count, on a synthetic manifest;
- feature pass: the frozen backbone per image on real reports (measured on a few, times n);
- head: one epoch of the paper's head on random features of the backbone's width.

    .venv/bin/python benchmarks/scaling.py [--sizes 1000,10000,100000] [--old-max 16000]

Prints a table, draws docs/scaling.png and writes the "Scaling" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
FIGURE = PROJECT_ROOT / "docs" / "scaling.png"
HASH_BYTES = 128
NEAR_COPY_SHARE = 0.01
"""Share of synthetic hashes that are a near copy (<= 40 bits flipped) of another."""
LAYOUT_LIKE_MAX = 20_000
"""Layout-like hashes are searched all against all (see near_duplicates): measured up to here."""
MANIFEST_SAMPLE = 200
FEATURE_SAMPLES = {(128, 256): 32, (512, 1024): 8}
"""Images per measured feature pass, by (height, width): small and the paper's size."""
HEAD_ARCH = "resnet50"
HEAD_MEASURED_MAX = 10_000
"""An epoch is linear in n: measured up to here, extrapolated beyond (on 2 shared cores one
epoch at 100,000 outlasts STAGE_TIMEOUT_S)."""
STAGE_TIMEOUT_S = 600
RESULTS = PROJECT_ROOT / ".bench" / "scaling.json"
"""Every measurement as it finishes, so `--resume` continues an interrupted run."""


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- inputs ----------------------------------------------------------------------------------


def real_bit_shares() -> np.ndarray:
    """Each dHash bit's share of ones over the real reports' unique contents (first 300 files)."""
    from ecg_mlflow.data.manifest import read_record, scan

    images, _ = scan(REAL_IMAGES)
    looks = {}
    for relpath, label, path in images[:300]:
        record = read_record(relpath, label, path)
        looks[record.sha256] = record.dhash
    from ecg_mlflow.data.hashing import hash_matrix

    return np.unpackbits(hash_matrix(list(looks.values())), axis=1).mean(axis=0)


def synthetic_hashes(n: int, kind: str, seed: int = 0) -> list[str]:
    """n hex hashes, NEAR_COPY_SHARE of them near copies of others; `kind` spread or layout."""
    rng = np.random.default_rng(seed)
    if kind == "spread":
        matrix = rng.integers(0, 256, (n, HASH_BYTES), dtype=np.uint8)
    else:
        shares = real_bit_shares()
        matrix = np.concatenate([np.packbits(rng.random((min(5000, n - s), shares.size)) < shares, axis=1)
                                 for s in range(0, n, 5000)])
    copies = rng.choice(n, int(n * NEAR_COPY_SHARE) * 2, replace=False).reshape(2, -1)
    for source, target in zip(*copies):
        bits = np.unpackbits(matrix[source])
        bits[rng.choice(bits.size, int(rng.integers(0, 41)), replace=False)] ^= 1
        matrix[target] = np.packbits(bits)
    return [row.tobytes().hex() for row in matrix]


def synthetic_manifest(n: int):
    """n records in 4 classes, about 40% byte-identical copies and 1% near copies."""
    from ecg_mlflow.data.classes import CLASSES
    from ecg_mlflow.data.manifest import ImageRecord, Manifest

    rng = np.random.default_rng(1)
    looks = synthetic_hashes(n, "spread")
    records = []
    for k in range(n):
        source = int(rng.integers(0, k)) if k and rng.random() < 0.4 else k
        label = CLASSES[source % len(CLASSES)]
        sha = f"{source:064x}"
        records.append(ImageRecord(f"{label}/{k}.jpg", label, sha, looks[source], 2213, 1572, 400_000))
    return Manifest(Path("."), tuple(records))


# --- stages (each in its own process) ---------------------------------------------------------


def stage_manifest(n: int) -> dict:
    from ecg_mlflow.data.manifest import read_record, scan

    images, _ = scan(REAL_IMAGES)
    sample = images[:MANIFEST_SAMPLE]
    start = time.perf_counter()
    for relpath, label, path in sample:
        read_record(relpath, label, path)
    per_image = (time.perf_counter() - start) / len(sample)
    manifest = synthetic_manifest(n)  # the records' memory at size n
    return {"seconds": per_image * n, "extrapolated": n > len(sample), "records": len(manifest.records),
            "per_image_s": per_image}


def stage_near(n: int, kind: str, search: str) -> dict:
    from ecg_mlflow.data.hashing import _reference_near_pairs, near_pairs

    hashes = synthetic_hashes(n, kind)
    function = near_pairs if search == "new" else _reference_near_pairs
    start = time.perf_counter()
    pairs = function(hashes)
    return {"seconds": time.perf_counter() - start, "pairs": len(pairs)}


def stage_split(n: int) -> dict:
    from ecg_mlflow.data.splits import make_split, measure_leakage

    manifest = synthetic_manifest(n)
    start = time.perf_counter()
    split = make_split(manifest, "grouped", 1)
    leakage = measure_leakage(manifest, split)
    paper = make_split(manifest, "paper", 1)
    paper_leakage = measure_leakage(manifest, paper)
    return {"seconds": time.perf_counter() - start, "grouped_leak": leakage.near, "paper_leak": paper_leakage.near}


def stage_features(height: int, width: int) -> dict:
    from ecg_mlflow.data.manifest import unique_contents
    from ecg_mlflow.model.features import FeatureKey, extract_features

    contents = dict(sorted(unique_contents(REAL_IMAGES).items())[: FEATURE_SAMPLES[(height, width)]])
    key = FeatureKey(HEAD_ARCH, "none", height, width, "none")
    with tempfile.TemporaryDirectory() as cache:
        extract_features(dict(list(contents.items())[:1]), key, cache)  # build the backbone, warm up
        start = time.perf_counter()
        _, stats = extract_features(contents, key, cache)
        seconds = time.perf_counter() - start
    return {"per_image_s": seconds / stats.misses, "images": stats.misses}


def stage_head(n: int) -> dict:
    from ecg_mlflow.model.backbones import get_spec
    from ecg_mlflow.data.classes import CLASSES
    from ecg_mlflow.model.head import HeadConfig, one_hot, train_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, get_spec(HEAD_ARCH).feature_dim), dtype=np.float32)
    y = one_hot([CLASSES[k % len(CLASSES)] for k in range(n)])
    cut = int(n * 0.8)
    train_head(x[:64], y[:64], x[64:80], y[64:80], HeadConfig(max_epochs=1), seed=1)  # imports, graphs
    start = time.perf_counter()
    train_head(x[:cut], y[:cut], x[cut:], y[cut:], HeadConfig(max_epochs=1), seed=1)
    return {"seconds": time.perf_counter() - start}


def run_stage(args: argparse.Namespace) -> None:
    stage, n = args.measure, args.n
    if stage == "manifest":
        result = stage_manifest(n)
    elif stage.startswith("near-"):
        _, kind, search = stage.split("-")
        result = stage_near(n, kind, search)
    elif stage == "split":
        result = stage_split(n)
    elif stage == "features":
        result = stage_features(args.height, args.width)
    else:
        result = stage_head(n)
    result["peak_mib"] = peak_mib()
    print(json.dumps(result))


def load_results(resume: bool) -> dict:
    return json.loads(RESULTS.read_text()) if resume and RESULTS.exists() else {}


def measure(stage: str, n: int = 0, **extra) -> dict | None:
    """One stage in a fresh process (or its result from an interrupted run with --resume);
    None if it ran past STAGE_TIMEOUT_S."""
    label = json.dumps([stage, n, extra], sort_keys=True)
    if label in MEASURED:
        return MEASURED[label]
    command = [sys.executable, __file__, "--measure", stage, "--n", str(n)]
    for name, value in extra.items():
        command += [f"--{name}", str(value)]
    print(f"  {stage} n={n} {extra or ''} ...", end=" ", flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    except subprocess.TimeoutExpired:
        print("timed out")
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{stage} n={n} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{result.get('seconds', result.get('per_image_s')):.3g} s, {result['peak_mib']:.0f} MiB", flush=True)
    MEASURED[label] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(MEASURED, indent=1))
    return result


MEASURED: dict[str, dict] = {}


# --- the report ---------------------------------------------------------------------------------


def collect(sizes: list[int], old_max: int) -> list[dict]:
    rows = []

    def add(stage: str, n: int, result: dict | None, how: str) -> None:
        if result is not None:
            rows.append({"stage": stage, "n": n, "seconds": result["seconds"], "peak_mib": result["peak_mib"],
                         "how": how})

    for n in sizes:
        add("manifest (SHA-256 + dHash)", n, measure("manifest", n),
            f"{MANIFEST_SAMPLE} real reports timed, x n; memory of n records")
        add("near duplicates, new, spread hashes", n, measure("near-spread-new", n), "measured")
        if n <= LAYOUT_LIKE_MAX:
            add("near duplicates, new, layout-like hashes", n, measure("near-layout-new", n), "measured")
        add("split (grouped + leakage, paper + leakage)", n, measure("split", n), "measured")
        if n <= HEAD_MEASURED_MAX:
            add("head, one epoch (paper's head, batch 16)", n, measure("head", n), "measured")
    for n in sorted({*[s for s in sizes if s <= old_max], old_max}):
        add("near duplicates, old all-pairs", n, measure("near-spread-old", n), "measured")
    layout = [r for r in rows if r["stage"].endswith("layout-like hashes")]
    if layout:
        last = layout[-1]
        for n in sizes:
            if n > last["n"]:
                rows.append({"stage": last["stage"], "n": n, "seconds": last["seconds"] * (n / last["n"]) ** 2,
                             "peak_mib": float("nan"), "how": f"quadratic from n={last['n']}"})
    head = [r for r in rows if r["stage"].startswith("head")]
    for n in sizes:
        if head and n > head[-1]["n"]:
            rows.append({**head[-1], "n": n, "seconds": head[-1]["seconds"] * n / head[-1]["n"],
                         "peak_mib": float("nan"), "how": f"linear from n={head[-1]['n']}"})
    for (height, width), _ in FEATURE_SAMPLES.items():
        result = measure("features", 0, height=height, width=width)
        for n in sizes if result else ():
            rows.append({"stage": f"feature pass {HEAD_ARCH} {height}x{width}", "n": n,
                         "seconds": result["per_image_s"] * n, "peak_mib": result["peak_mib"],
                         "how": f"{result['images']} real reports timed, x n (one process)"})
    return rows


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        measured = all(r["how"] == "measured" for r in mine)
        ax.loglog([r["n"] for r in mine], [r["seconds"] for r in mine], "o-" if measured else "s--", label=stage)
    ax.axhline(300, color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0] * 1.1, 330, "5 minutes", color="grey", fontsize=8)
    ax.set_xlabel("images (hashes)")
    ax.set_ylabel("seconds (dashed: extrapolated)")
    ax.set_title("ecg-mlflow: time per stage against dataset size")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def seconds_at(rows: list[dict], stage_start: str, n: int) -> float:
    return next(r["seconds"] for r in rows if r["stage"].startswith(stage_start) and r["n"] == n)


def peak_at(rows: list[dict], stage_start: str, n: int) -> float:
    return next(r["peak_mib"] for r in rows if r["stage"].startswith(stage_start) and r["n"] == n)


def write_report(rows: list[dict], sizes: list[int], old_max: int) -> str:
    from report import machine, markdown_table, write_section

    table = markdown_table(
        ["stage", "n", "seconds", "peak RSS MiB", "how"],
        [[r["stage"], f"{r['n']:,}", f"{r['seconds']:.3g}",
          "-" if np.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}", r["how"]] for r in rows],
    )
    big = max(sizes)
    hours_paper = seconds_at(rows, f"feature pass {HEAD_ARCH} 512x1024", big) / 3600
    new_s, new_mib = seconds_at(rows, "near duplicates, new, spread", big), peak_at(rows, "near duplicates, new, spread", big)
    old_max = max(r["n"] for r in rows if r["stage"].startswith("near duplicates, old"))
    old_s, old_mib = seconds_at(rows, "near duplicates, old", old_max), peak_at(rows, "near duplicates, old", old_max)
    layout = [r for r in rows if r["stage"].endswith("layout-like hashes") and r["how"] == "measured"]
    manifest_min = seconds_at(rows, "manifest", big) / 60
    head_n = max(r["n"] for r in rows if r["stage"].startswith("head") and r["how"] == "measured")
    head_s, head_mib = seconds_at(rows, "head", big), peak_at(rows, "head", head_n)
    body = (
        f"`benchmarks/scaling.py --sizes {','.join(map(str, sizes))} --old-max {old_max}`; every (stage, n) in "
        f"a fresh process, peak RSS is that whole process (Python, NumPy, TensorFlow where used). Machine: "
        f"{machine()}, shared with other work, so times are noisy.\n\n"
        f"![time per stage against dataset size](scaling.png)\n\n{table}\n\n"
        f"**Near duplicates.** The multi-index search (65 blocks of the 1024-bit dHash, "
        f"ecg_mlflow/data/near_duplicates.py) does {big:,} spread hashes in {new_s:.1f} s and {new_mib:.0f} MiB; "
        f"the old all-pairs search needed {old_s:.1f} s and {old_mib:.0f} MiB for {old_max:,} and grows with "
        f"n^2 in both (about 40 GiB of distances at 100,000). Hashes of one document layout are the hard case: "
        f"with each bit as often set as in the real reports, 16-bit blocks match for most pairs, so the search "
        f"falls back to comparing all pairs in row chunks: exact and bounded in memory"
        + (f" ({layout[-1]['peak_mib']:.0f} MiB at {layout[-1]['n']:,}), but quadratic in time" if layout else "")
        + ". Real collections sit between the two (on the 491 real reports 52% of the distinct pairs share a "
        "block); past a few hundred thousand layout-like images this stage is the one to give its own "
        "machine or to shard by class.\n\n"
        f"**Manifest and feature pass.** Hashing costs a read and a cheap decode per image "
        f"({manifest_min:.0f} min for {big:,} on one process), the backbone at the paper's 512 x 1024 "
        f"{hours_paper:.1f} h for {big:,} on this machine: the feature pass is where one machine stops being "
        f"enough. It is linear and independent per image, so `ecg-mlflow features --shard I/N` splits it over "
        f"N processes or an Indexed Kubernetes Job (infra/k8s/submit_features.py) writing one shared cache "
        f"(S3 or a shared folder); each unique image is computed once across all of them, and every later "
        f"train, study and tune run reads it from the cache.\n\n"
        f"**Split and head.** Splitting takes {seconds_at(rows, 'split', big):.0f} s at {big:,} (four "
        f"near-duplicate searches and the draws). One epoch of the paper's head on {big:,} features takes "
        f"about {head_s:.0f} s (linear from {head_n:,}, where it peaked at {head_mib:.0f} MiB; the features "
        f"alone are {big * 2048 * 4 / 2**20:.0f} MiB at ResNet-50's width): it fits one machine up to about a million "
        f"images, after which the features no longer fit in memory and the head would have to stream them "
        f"from the cache."
    )
    write_section("Scaling", body)
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--old-max", type=int, default=16_000, help="largest n for the old all-pairs search")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--resume", action="store_true", help=f"reuse the measurements in {RESULTS}")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.measure:
        run_stage(args)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    MEASURED.update(load_results(args.resume))
    started = time.perf_counter()
    rows = collect(sizes, args.old_max)
    print(f"measured in {time.perf_counter() - started:.0f} s")
    if args.no_write:
        for row in rows:
            print(row)
        return
    draw(rows, FIGURE)
    print(write_report(rows, sizes, args.old_max))


if __name__ == "__main__":
    main()
