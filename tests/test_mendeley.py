"""`data verify` against the published facts, `data download` against local HTTP servers."""

from __future__ import annotations

import http.server
import io
import shutil
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from ecg_mlflow.cli import main
from ecg_mlflow.data.mendeley import EXIT_CHANGED, EXIT_EXTRA, EXIT_MISSING, MENDELEY_URL, load_facts, verify
from ecg_mlflow.data.download import DownloadError, safe_extract

MI_FOLDER = "ECG Images of Myocardial Infarction Patients (240x12=2880)"


def test_packaged_facts_are_the_published_ones() -> None:
    facts = load_facts()
    assert len(facts) == 928
    assert Counter(f.label for f in facts) == {"MI": 239, "HMI": 172, "AHB": 233, "NORM": 284}
    assert len({f.sha256 for f in facts}) == 491
    assert MENDELEY_URL == "https://data.mendeley.com/public-api/zip/gwbz3fsgp8/download/2"


def test_packaged_facts_equal_the_shared_copy(real_facts: Path) -> None:
    packaged = Path(__file__).resolve().parents[1] / "ecg_mlflow" / "package_data" / real_facts.name
    assert packaged.read_bytes() == real_facts.read_bytes()


def test_verify_reports_missing_changed_and_extra(real_originals: Path, tmp_path: Path) -> None:
    root = tmp_path / "download"
    shutil.copytree(real_originals, root)
    result = verify(root)
    assert len(result.matched) == 8 and len(result.missing) == 920
    assert result.exit_code == EXIT_MISSING

    changed = f"{MI_FOLDER}/MI(10).jpg"
    with open(root / changed, "ab") as f:
        f.write(b"\0")
    (root / MI_FOLDER / "MI(9999).jpg").write_bytes(b"an extra file")
    (root / MI_FOLDER / ".DS_Store").write_bytes(b"ignored")
    result = verify(root)
    assert (len(result.matched), len(result.missing)) == (7, 920)
    assert result.changed == (changed,)
    assert result.extra == (f"{MI_FOLDER}/MI(9999).jpg",)
    assert result.exit_code == EXIT_MISSING | EXIT_CHANGED | EXIT_EXTRA

    cli = CliRunner().invoke(main, ["data", "verify", str(root)])
    assert cli.exit_code == EXIT_MISSING | EXIT_CHANGED | EXIT_EXTRA
    assert "7 of 928 files match, 920 missing, 1 changed, 1 extra" in cli.output
    assert f"changed: {changed}" in cli.output


def test_verify_matches_short_folder_names_and_all_clear_exit_code(real_originals: Path, tmp_path: Path) -> None:
    root = tmp_path / "short"
    shutil.copytree(real_originals / MI_FOLDER, root / "MI")
    mi = [f for f in load_facts() if f.label == "MI" and f.relpath.rsplit("/", 1)[1] in {"MI(1).jpg", "MI(10).jpg"}]
    result = verify(root, facts=tuple(mi))
    assert result.matched == ("MI/MI(1).jpg", "MI/MI(10).jpg") and result.exit_code == 0


def test_verify_of_the_half_size_copies_shows_them_changed(real_images: Path) -> None:
    result = verify(real_images)
    assert len(result.changed) > 0 and not result.missing and not result.extra
    assert result.exit_code == EXIT_CHANGED


def _archive(originals: Path) -> bytes:
    """Like a Mendeley zip: a top folder, one class as a nested zip, macOS debris."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for path in sorted((originals / "Normal Person ECG Images (284x12=3408)").iterdir()):
            zf.write(path, f"Normal Person ECG Images (284x12=3408)/{path.name}")
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as zf:
        for path in sorted(originals.rglob("*.jpg")):
            rel = path.relative_to(originals).as_posix()
            if not rel.startswith("Normal"):
                zf.write(path, f"ECG Images dataset of Cardiac Patients/{rel}")
                zf.writestr(f"__MACOSX/ECG Images dataset of Cardiac Patients/{rel}", b"resource fork")
        zf.writestr("ECG Images dataset of Cardiac Patients/Normal.zip", inner.getvalue())
    return outer.getvalue()


@contextmanager
def _server(answer: Callable[[int], tuple[int, bytes]]) -> Iterator[tuple[str, list[int]]]:
    """An HTTP server on 127.0.0.1 whose n-th GET (from 1) gets `answer(n)`."""
    calls: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            calls.append(len(calls) + 1)
            status, body = answer(len(calls))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dataset.zip", calls
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_unpacks_class_folders_and_verifies(real_originals: Path, tmp_path: Path) -> None:
    archive = _archive(real_originals)
    with _server(lambda n: (200, archive)) as (url, calls):
        cli = CliRunner().invoke(main, ["data", "download", "--url", url, str(tmp_path / "data")])
    assert cli.exit_code == EXIT_MISSING, cli.output  # 8 of the 928 files were served
    assert "8 of 928 files match, 920 missing, 0 changed, 0 extra" in cli.output
    assert calls == [1]
    placed = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*.jpg"))
    assert placed == sorted(p.relative_to(real_originals).as_posix() for p in real_originals.rglob("*.jpg"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in real_originals.iterdir())


def test_download_retries_after_a_failed_request(real_originals: Path, tmp_path: Path) -> None:
    archive = _archive(real_originals)
    with _server(lambda n: (503, b"busy") if n == 1 else (200, archive)) as (url, calls):
        cli = CliRunner().invoke(main, ["data", "download", "--url", url, "--backoff", "0", str(tmp_path / "d")])
    assert cli.exit_code == EXIT_MISSING, cli.output
    assert calls == [1, 2]
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 8


def test_download_that_always_fails_says_what_to_do(tmp_path: Path) -> None:
    with _server(lambda n: (500, b"down")) as (url, calls):
        cli = CliRunner().invoke(
            main, ["data", "download", "--url", url, "--attempts", "3", "--backoff", "0", str(tmp_path / "d")]
        )
    assert cli.exit_code == 1
    assert calls == [1, 2, 3]
    assert "after 3 attempt(s)" in cli.output and "HTTP 500" in cli.output
    assert "manually" in cli.output and "ecg-mlflow data verify" in cli.output
    assert not list((tmp_path / "d").rglob("*"))  # no half-finished download left behind


def test_download_of_an_archive_without_the_dataset(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("something/else.txt", "hello")
    with _server(lambda n: (200, buf.getvalue())) as (url, _):
        cli = CliRunner().invoke(main, ["data", "download", "--url", url, str(tmp_path / "d")])
    assert cli.exit_code == 1 and "no folder with images for class MI" in cli.output


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escaped.txt", "evil")
    (tmp_path / "into").mkdir()
    with pytest.raises(DownloadError, match=r"'\.\./escaped\.txt' points outside"):
        safe_extract(archive, tmp_path / "into")
    assert not (tmp_path / "escaped.txt").exists()
