"""data.Progress, the progress line of the long loops (fid.py generation and statistics, data.py decoding and latent
encoding, file hashing for convert.py), and where each loop reports it."""
import re

import pytest

import convert
import data
import fid
from conftest import tiny_ref
from test_convert import tiny_edm  # noqa: F401 (a fixture)
from test_data import StandInEncoder, write_image_zip, write_photo_zip


def test_a_line_every_few_seconds_with_rate_and_eta(capsys):
    """Nothing before `every` seconds, then at most one line per `every` seconds with the mean rate since the start and
    the time left at that rate; a last line at the total once any was printed; stdout untouched."""
    now = [100.0]
    progress = data.Progress("generating", 1000, "images", every=5, clock=lambda: now[0])
    for t, done in [(101, 100), (104.9, 400), (105, 500), (107, 700), (110, 800), (112, 1000)]:
        now[0] = t
        progress.update(done)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["generating 500/1000 images, 100 images/s, ETA 0m05s",
                                              "generating 800/1000 images, 80 images/s, ETA 0m02s",
                                              "generating 1000/1000 images, 83.3 images/s, done in 0m12s"]


def test_a_short_loop_prints_nothing(capsys):
    now = [0.0]
    progress = data.Progress("hashing", 3, every=5, clock=lambda: now[0])
    for done in (1, 2, 3):
        now[0] += 1
        progress.update(done)
    assert capsys.readouterr().err == ""


@pytest.fixture
def every_update(monkeypatch):
    """Every loop's Progress prints at every update (every=0)."""
    real = data.Progress

    def eager(*args, **kwargs):
        return real(*args, **{**kwargs, "every": 0})
    monkeypatch.setattr(data, "Progress", eager)  # fid.py's loops use data.Progress too


def lines(capsys, what, unit="images"):
    """(done, total) of each progress line of `what` on stderr, each checked for its form."""
    found = []
    for line in capsys.readouterr().err.splitlines():
        if line.startswith(what + " "):
            m = re.fullmatch(rf"{re.escape(what)} (\d+)/(\d+) {unit}, [\d.e+]+ {unit}/s, "
                             rf"(ETA \d+m\d\ds|done in \d+m\d\ds)", line)
            assert m, line
            assert m[3].startswith("done") == (m[1] == m[2]), line
            found.append((int(m[1]), int(m[2])))
    return found


@pytest.mark.slow
def test_fid_calc_counts_the_images_of_every_repeat(tiny_edm, detector, tmp_path, capsys, every_update):  # noqa: F811
    ckpt = str(tmp_path / "edm.pt")
    convert.convert(tiny_edm[1], ckpt)
    fid.cli(["calc", "--ckpt", ckpt, "--ref", tiny_ref(tmp_path / "ref.npz"), "--detector", detector[0], "--num", "3",
             "--batch", "2", "--repeats", "2", "--steps", "1", "--device", "cpu"])
    assert lines(capsys, "generating") == [(2, 6), (3, 6), (5, 6), (6, 6)]


@pytest.mark.parametrize("resolution", [None, 16])
def test_fid_ref_counts_the_images(detector, tmp_path, capsys, every_update, resolution):
    zip_ = str(tmp_path / "d.zip")
    write_image_zip(zip_, n=5, res=16)
    crop = [] if resolution is None else ["--resolution", str(resolution)]
    fid.cli(["ref", "--data", zip_, "--out", str(tmp_path / "r.npz"), "--detector", detector[0], "--batch", "2",
             "--device", "cpu", "--cache", str(tmp_path), *crop])
    assert lines(capsys, f"features of {zip_}") == [(2, 5), (4, 5), (5, 5)]


def test_data_encoding_decoding_and_hashing_report_progress(tmp_path, capsys, monkeypatch, every_update):
    write_photo_zip(tmp_path / "photos.zip", [(40, 32), (32, 48), (32, 32), (64, 40), (33, 35)], [0, 2, 1, 2, 0])
    data.encode_latents(str(tmp_path / "photos.zip"), str(tmp_path / "lat"), StandInEncoder(), batch=2, resolution=32)
    assert lines(capsys, "encoding") == [(2, 5), (4, 5), (5, 5)]
    monkeypatch.setattr(data, "MMAP_BYTES", 0)  # every set counts as large: decoded into the cache
    write_image_zip(tmp_path / "d.zip", n=3, res=8)
    data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path / "cache"))
    assert lines(capsys, "decoding") == [(1, 3), (2, 3), (3, 3)]
    (tmp_path / "big.bin").write_bytes(b"\1" * (5 << 19))  # 2.5 MiB: three blocks
    data.file_digest(str(tmp_path / "big.bin"))
    assert lines(capsys, "sha256 of big.bin", "MiB") == [(1, 3), (2, 3), (3, 3)]
