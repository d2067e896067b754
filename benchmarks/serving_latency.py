"""Serving latency: the served pyfunc over HTTP against the same pyfunc in process.

Trains a tiny ResNet-50 model at the paper's 512 x 1024 per engine (`--engines`, default
keras and openvino; weights=none, a few epochs on a small synthetic set: the network and the
input size are the paper's, the accuracy is not), logs the serving pyfunc of each, starts `mlflow models serve --env-manager local` on a loopback
port, and sends the 8 untouched 2213 x 1572 originals one image per request, from 1 and
from 4 concurrent clients. The same images go through `mlflow.pyfunc.load_model(...)
.predict` in this process (1 and 4 threads) for the baseline. Prints a table and writes the
`## Serving latency` section of docs/benchmarks.md.

    .venv/bin/python benchmarks/serving_latency.py --rounds 3

Everything (MLflow store, feature cache, model) lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ORIGINALS = PROJECT_ROOT.parent / "shared" / "data" / "ecg-originals-sample"
DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
SECTION = "Serving latency"
VENV_BIN = Path(sys.executable).parent
AIM = 1.30
"""The issue's aim: the server adds at most 30% to the in-process time per image."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the 8 originals per mode")
    parser.add_argument("--image-height", default="512")
    parser.add_argument("--image-width", default="1024")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--engines", default="keras,openvino", help="one model per engine, measured one after another")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return parser.parse_args()


def train_tiny_model(root: Path, args: argparse.Namespace, engine: str) -> str:
    """One real train run at the requested size through `engine`; returns its run id."""
    import mlflow

    from ecg_mlflow import schema
    from ecg_mlflow.config import parse_train_config
    from ecg_mlflow.synth.reports import write_synthetic_dataset
    from ecg_mlflow.train import train_and_log

    data = root / "data"
    write_synthetic_dataset(data, per_class=4, seed=0, width=1106, height=786)
    config = parse_train_config(arch=args.arch, seed="1", data=str(data), weights="none",
                                image_height=args.image_height, image_width=args.image_width,
                                max_epochs="2", cache_dir=str(root / "cache"), engine=engine)
    with mlflow.start_run(run_name=f"serving-benchmark-train-{engine}", tags={schema.TAG_ROLE: schema.ROLE_TRAIN}) as run:
        train_and_log(config, progress=False)
    return run.info.run_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, TF_CPP_MIN_LOG_LEVEL="3")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"server not up after 300 s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def measure(predict_one, images: list[bytes], rounds: int, clients: int) -> dict[str, float]:
    """Send every image `rounds` times, one per call, from `clients` threads."""
    jobs = [image for _ in range(rounds) for image in images]

    def timed(image: bytes) -> float:
        start = time.perf_counter()
        predict_one(image)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(timed, jobs))
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "throughput": len(jobs) / wall, "n": len(jobs)}


def measure_model(model_uri: str, tracking_uri: str, log: Path, images: list[bytes], rounds: int,
                  engine: str) -> dict[tuple[str, str, int], dict[str, float]]:
    """The model in process (1 and 4 threads), then behind `mlflow models serve` (1 and 4 clients)."""
    import mlflow
    import pandas as pd
    import requests

    from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN

    model = mlflow.pyfunc.load_model(model_uri)
    in_process = lambda image: model.predict(pd.DataFrame({IMAGE_COLUMN: [image]}))  # noqa: E731
    in_process(images[0])
    results = {(engine, "in process", 1): measure(in_process, images, rounds, 1),
               (engine, "in process", 4): measure(in_process, images, rounds, 4)}

    process, url = start_server(model_uri, tracking_uri, log)
    try:
        session_local = __import__("threading").local()

        def over_http(image: bytes) -> None:
            session = getattr(session_local, "s", None) or requests.Session()
            session_local.s = session
            body = json.dumps({"dataframe_records": [{IMAGE_COLUMN: base64.b64encode(image).decode("ascii")}]})
            response = session.post(f"{url}/invocations", data=body,
                                    headers={"Content-Type": "application/json"}, timeout=600)
            response.raise_for_status()

        over_http(images[0])
        results[(engine, "server", 1)] = measure(over_http, images, rounds, 1)
        results[(engine, "server", 4)] = measure(over_http, images, rounds, 4)
    finally:
        stop_server(process)
    return results


def main() -> None:
    args = parse_args()
    if not ORIGINALS.is_dir():
        sys.exit(f"originals not found at {ORIGINALS}")
    images = [p.read_bytes() for p in sorted(ORIGINALS.rglob("*")) if p.is_file()]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

    import mlflow

    from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN
    from ecg_mlflow.serving.packaging import log_serving_model

    with tempfile.TemporaryDirectory(prefix="ecg-serving-bench-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("serving-benchmark", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp)
        results: dict[tuple[str, str, int], dict[str, float]] = {}
        for engine in args.engines.split(","):
            print(f"training a tiny {args.arch} at {args.image_height}x{args.image_width}, engine {engine} ...", flush=True)
            source = train_tiny_model(root, args, engine)
            with mlflow.start_run(run_name=f"serving-benchmark-model-{engine}"):
                model_uri = log_serving_model(source).model_uri
            results.update(measure_model(model_uri, uri, root / f"server-{engine}.log", images, args.rounds, engine))

        # what the client pays before the request leaves: base64 + JSON of one original
        start = time.perf_counter()
        for image in images:
            json.dumps({"dataframe_records": [{IMAGE_COLUMN: base64.b64encode(image).decode("ascii")}]})
        encode_ms = (time.perf_counter() - start) / len(images) * 1000

    report(results, encode_ms, float(np.mean([len(image) for image in images])), args)


def report(results: dict, encode_ms: float, mean_image_bytes: float, args: argparse.Namespace) -> None:
    from report import machine, markdown_table, write_section

    rows = [[engine, mode, clients, f"{r['p50']:.0f}", f"{r['p95']:.0f}", f"{r['throughput']:.2f}", r["n"]]
            for (engine, mode, clients), r in results.items()]
    table = markdown_table(["engine", "path", "clients", "p50 ms/image", "p95 ms/image", "images/s", "requests"], rows)
    engines = list(dict.fromkeys(engine for engine, _, _ in results))
    lines = []
    for engine in engines:
        ratio_1 = results[(engine, "server", 1)]["p50"] / results[(engine, "in process", 1)]["p50"]
        ratio_4 = results[(engine, "in process", 4)]["throughput"] / results[(engine, "server", 4)]["throughput"]
        verdict = "within" if ratio_1 <= AIM else "above"
        lines.append(f"- {engine}: server / in process, p50 per image, 1 client: **{ratio_1:.2f}x** ({verdict} the "
                     f"{AIM:.2f}x aim); in-process / server throughput, 4 clients: {ratio_4:.2f}x.")
    for engine in engines[1:]:
        speedup = results[(engines[0], "server", 1)]["p50"] / results[(engine, "server", 1)]["p50"]
        lines.append(f"- Served p50, 1 client, {engines[0]} / {engine}: **{speedup:.2f}x** (the same network, "
                     "the same requests, one engine after the other).")
    summary = "\n".join(lines)
    body = f"""Written by `benchmarks/serving_latency.py --rounds {args.rounds} --engines {args.engines}` on {machine()}
(shared; load average {os.getloadavg()[0]:.1f} when written).

One {args.arch} model per engine at {args.image_height} x {args.image_width} (weights=none: the network and input size are
the paper's), served by `mlflow models serve --env-manager local` (1 uvicorn worker) on a
loopback port; each request carries one untouched 2213 x 1572 original (about
{mean_image_bytes / 1024:.0f} KiB JPEG) as base64 JSON.
Latency is per request (= per image); "in process" is `mlflow.pyfunc.load_model(...).predict`
on a one-row DataFrame of the same bytes.

{table}

{summary}
- Client-side base64 + JSON encoding of one original: {encode_ms:.1f} ms.

Where the time goes: decoding the 2213 x 1572 JPEG and resizing it (`load_pixels`) plus the
backbone's forward pass dominate both paths; the server adds base64/JSON work (a few ms per
image) and one loopback HTTP round trip. Inference is serialised inside the model (one lock:
the engine already spreads one batch over all cores), so with 4 clients requests queue:
throughput stays near the 1-client rate and latency grows about 4x, in process as on the
server. Where cores are spare, image decoding of one request overlaps the inference of
another; on a loaded 2-core machine there is none to spare. More uvicorn workers
(`--workers`) would only split the same cores between several copies of the model.
"""
    print(table)
    print(summary)
    if not args.no_doc:
        write_section(SECTION, body)
        print(f"wrote the '{SECTION}' section of {DOC}")


if __name__ == "__main__":
    main()
