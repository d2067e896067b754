"""Peak RSS of decoding one large image for a 512 x 1024 model, old decode path vs load_pixels.

Run twice per case (the first run writes the test image): python benchmarks/decode_memory.py new png; then old|new png|jpeg|palette.
"""
import io, resource, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "tests")
import numpy as np
from PIL import Image, ImageOps
from ecg_mlflow.data.preprocess import load_pixels, to_rgb
from serving_fixtures import palette_bomb
which, case = sys.argv[1], sys.argv[2]
def report_like(w, h):
    rng = np.random.default_rng(0); px = np.full((h, w, 3), 235, np.uint8)
    for _ in range(w * h // 20000):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 200); px[y:y+3, x:x+200] = (20, 20, 40)
    px[::40, :] = (240, 160, 160); return Image.fromarray(px)
buf = io.BytesIO()
cached = Path(f"/tmp/harden_mem_{case}.bin")
if cached.exists():
    data = cached.read_bytes()
elif case == "png":
    im = report_like(4096, 4096).convert("RGBA"); im.save(buf, "PNG"); data = buf.getvalue(); del im
elif case == "palette":
    data = palette_bomb(4000, 4000)
else:
    report_like(4096, 4096).save(buf, "JPEG", quality=90); data = buf.getvalue()
if not cached.exists():
    cached.write_bytes(data); sys.exit(0)
import gc; gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
try:
    if which == "new":
        load_pixels(data, 512, 1024)
    else:
        im = to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))); im.resize((1024, 512), Image.Resampling.BILINEAR)
    status = "decoded"
except Exception as e:
    status = f"refused: {str(e)[:60]}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{case:8} {which:4} {len(data)//1024:6} KiB  peak growth {peak - base:7.0f} MiB  {time.perf_counter()-t:5.2f} s  {status}")
