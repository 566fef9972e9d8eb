"""curves.py: the picture of a run's metrics.jsonl (panels, log scales, lines where the values are), and train.py
rewriting curves.png at every checkpoint."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import curves
import fid
import train


def colored(image, area):
    """(rows, columns) of the line-coloured pixels inside a plot area: the greys of grid, axes and text excluded."""
    x0, y0, x1, y1 = (int(v) for v in area)
    pixels = np.asarray(image.convert("RGB"), dtype=int)[y0 + 2:y1 - 1, x0 + 2:x1 - 1]
    rows, cols = np.nonzero(pixels.max(-1) - pixels.min(-1) > 60)
    return rows, cols


def records(n=30):
    """A run's records: the loss falls from 10 to 0.1 (log scale), lr warms up, one loss is NaN, FID 3 times."""
    out = []
    for i in range(1, n + 1):
        loss = 10 * 0.01 ** ((i - 1) / (n - 1))
        out.append(dict(step=100 * i, kimg=25.6 * i, loss=math.nan if i == 15 else loss,
                        loss_by_t={"0-0.5": 2 * loss, "0.5-1": loss / 2}, mse_v=1 + 1 / i, lr=1e-3 * min(1, i / 10),
                        grad_norm=1 / i, grad_norm_max=2 / i, img_per_s=1000 + i, gpu_mem_gib=0.0,
                        nonfinite_grads=0, nonfinite_steps=0))
        if i % 10 == 0:
            out.append(dict(step=100 * i, kimg=25.6 * i, fid=50 / i, fid_num=1000))
    return out


def test_every_panel_has_its_lines():
    """Seven panels on a 4 x 2 grid, the loss, its bins, the gradient norm and FID on log scales (they span more than
    10x), lr and img/s linear; every panel holds line pixels across its width, and the falling loss runs from the top
    left to the bottom right (a flipped or shifted axis would not)."""
    image, drawn = curves.render(records(), "a run")
    assert image.size == (4 * curves.PANEL_W, curves.HEADER + 2 * curves.PANEL_H)
    assert [title for title, _ in drawn] == [
        "loss (the optimised objective) (log scale)", "loss per time bin (low t: near the data) (log scale)",
        "the method's logs", "gradient norm (before clipping) (log scale)", "learning rate", "throughput (img/s)",
        "FID (lower is better)"]
    for title, area in drawn:
        rows, cols = colored(image, area)
        width = area[2] - area[0]
        start = 0.3 if title.startswith("FID") else 0  # its first value is a third of the way, at step 1000 of 3000
        assert len(cols) > 100 and start < cols.min() / width < start + 0.1 and cols.max() > 0.9 * width, title
    rows, cols = colored(image, drawn[0][1])
    height, width = drawn[0][1][3] - drawn[0][1][1], drawn[0][1][2] - drawn[0][1][0]
    assert rows[cols < 0.1 * width].mean() < 0.2 * height and rows[cols > 0.9 * width].mean() > 0.8 * height


def test_without_fid_six_panels_and_no_records_one_line():
    image, drawn = curves.render([r for r in records() if "fid" not in r])
    assert image.size == (3 * curves.PANEL_W, curves.HEADER + 2 * curves.PANEL_H) and len(drawn) == 6
    image, drawn = curves.render([])
    assert [title for title, _ in drawn] == ["loss (the optimised objective)", "learning rate", "throughput (img/s)"]


def test_save_skips_a_torn_line_and_replaces_the_picture(tmp_path):
    metrics, png = str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png")
    with open(metrics, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records(12)) + '{"step": 13, "lo')
    assert curves.save(metrics, png, "title") == 13  # 12 training records and one FID record
    first = open(png, "rb").read()
    with open(metrics, "a") as f:
        f.write("\n" + json.dumps(records(13)[-1]) + "\n")
    assert curves.save(metrics, png) == 14 and open(png, "rb").read() != first
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl"]  # no temp file left


def test_a_run_rewrites_curves_png_at_every_checkpoint(tmp_path, monkeypatch):
    """curves.png after each checkpoint (steps 10 and 20, the last) from every record logged so far; small (< 150 KB),
    six panels with lines in each."""
    calls, save = [], curves.save
    monkeypatch.setattr(curves, "save", lambda *args: calls.append(save(*args)))
    out = str(tmp_path / "run")
    train.cli(["--method", "meanflow", "--data", "toy", "--steps", "20", "--batch", "16", "--log-every", "5",
               "--ckpt-every", "10", "--num-samples", "50", "--out", out])
    assert calls == [2, 4]
    png = os.path.join(out, "curves.png")
    assert os.path.getsize(png) < 150_000
    image = Image.open(png)
    assert image.size == (3 * curves.PANEL_W, curves.HEADER + 2 * curves.PANEL_H)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    _, drawn = curves.render(records)
    for title, area in drawn:
        assert len(colored(image, area)[1]) > 100, title


@pytest.mark.parametrize("value, text", [(0, "0"), (0.002, "0.002"), (1500, "1500"), (22000, "22000"), (2e-5, "2e-5"),
                                         (3e6, "3e6"), (0.30000000000000004, "0.3")])
def test_tick_labels_are_short(value, text):
    assert curves._label(value) == text


def test_a_run_with_fid_draws_its_panel(tmp_path, monkeypatch):
    """--fid-every's records make a seventh panel (a stand-in FID: the protocol is tests/test_fid.py's)."""
    monkeypatch.setattr(fid, "fid_evaluator", lambda *args: lambda ema: 12.5)
    (tmp_path / "ref.npz").write_bytes(b"")
    out = str(tmp_path / "run")
    train.cli(["--method", "meanflow", "--data", "toy", "--steps", "10", "--batch", "16", "--log-every", "5",
               "--fid-every", "5", "--fid-ref", str(tmp_path / "ref.npz"), "--num-samples", "50", "--out", out])
    image = Image.open(os.path.join(out, "curves.png"))
    assert image.size == (4 * curves.PANEL_W, curves.HEADER + 2 * curves.PANEL_H)
    title, area = curves.render([json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))])[1][-1]
    assert title == "FID (lower is better)" and len(colored(image, area)[1]) > 30  # two dots and the line between


def test_a_failed_picture_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(curves, "save", full_disk)
    out = str(tmp_path / "run")
    train.cli(["--method", "meanflow", "--data", "toy", "--steps", "2", "--batch", "16", "--num-samples", "50",
               "--out", out])
    assert f"warning: cannot write {out}/curves.png (No space left on device)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and os.path.exists(os.path.join(out, "samples.png"))
