"""curves.png: a run's metrics.jsonl as one picture, drawn with pillow alone. train.py rewrites it at every checkpoint.

Panels, each against kimg (thousands of training images seen), all on the same kimg axis: the optimised loss, the loss
per bin of the method's time (the diagnostic for its time distribution and weighting), the method's own logs, the
gradient norm, the learning rate, the throughput and, when --fid-every measured it, FID. A panel whose values are all
positive and span more than a factor of 10 is drawn on a log scale and says so in its title. Gaps in a line are
values that were not finite. It imports nothing of the project (numpy and PIL only).
"""
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 400, 250  # pixels of one panel
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 34  # the plot area's margins inside a panel
HEADER = 30  # the title line above the panels
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # matplotlib's tab10
GRID, AXIS, TEXT = (225, 225, 225), (90, 90, 90), (30, 30, 30)
# Keys with a panel of their own, or none (bookkeeping); every other number in a record is one of the method's logs.
NOT_METHOD_LOGS = {"step", "kimg", "loss", "loss_by_t", "lr", "img_per_s", "gpu_mem_gib", "fid", "fid_num"}
GRAD_NORMS = dict(grad_norm="last step", grad_norm_max="interval max")  # the gradient norm panel's lines


def read_metrics(path):
    """The records of a metrics.jsonl; a torn or unreadable line is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("kimg"), (int, float)):
                records.append(record)
    return records


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(records, get):
    """(kimg, value) arrays over the records for which get(record) is not None."""
    pairs = [(float(r["kimg"]), _number(get(r))) for r in records if get(r) is not None]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def panels_of(records):
    """[(title, [(label, kimg, values)])] of the panels the records fill, in drawing order."""
    train = [r for r in records if "loss" in r]
    panels = [("loss (the optimised objective)", [("loss", *_series(train, lambda r: r.get("loss")))])]
    bins = list(dict.fromkeys(k for r in train for k in (r.get("loss_by_t") or {})))
    if bins:
        panels.append(("loss per time bin (low t: near the data)", [
            (f"t {b}", *_series(train, lambda r, b=b: (r.get("loss_by_t") or {}).get(b))) for b in bins]))
    logs = [k for k in dict.fromkeys(k for r in train for k in r)
            if k not in NOT_METHOD_LOGS and not k.startswith(("grad_norm", "nonfinite"))
            and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in train)]
    if logs:
        panels.append(("the method's logs", [(k, *_series(train, lambda r, k=k: r.get(k))) for k in logs]))
    grads = [k for k in GRAD_NORMS if any(k in r for r in train)]
    if grads:
        panels.append(("gradient norm (before clipping)",
                       [(GRAD_NORMS[k], *_series(train, lambda r, k=k: r.get(k))) for k in grads]))
    panels.append(("learning rate", [("lr", *_series(train, lambda r: r.get("lr")))]))
    panels.append(("throughput (img/s)", [("img/s", *_series(train, lambda r: r.get("img_per_s")))]))
    fids = [r for r in records if "fid" in r]
    if fids:
        panels.append(("FID (lower is better)", [("fid", *_series(fids, lambda r: r.get("fid")))]))
    return panels


# --- Axes ----------------------------------------------------------------------------------------------------------


def _label(v):
    """A tick value in few characters: 0.002, 1500, 22000, 2e-5, 3e6."""
    if v == 0:
        return "0"
    if 1 <= abs(v) < 1e6:
        return f"{v:.6g}"
    if 1e-3 <= abs(v) < 1:
        return f"{v:.4g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _linear_ticks(lo, hi, n=5):
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo, hi):
    """Powers of ten in [lo, hi]; with fewer than two, also their 2 and 5 multiples."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas
                 if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
    return ticks


class Axis:
    """A value range mapped onto pixels [p0, p1], linear or log."""

    def __init__(self, values, p0, p1, log=False):
        lo, hi = float(np.min(values)), float(np.max(values))
        self.log, self.p0, self.p1 = log, p0, p1
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        pad = (hi - lo) * 0.05 or (abs(hi) * 0.1 if hi else 1.0)
        self.lo, self.hi = lo - pad, hi + pad

    def __call__(self, v):
        v = np.log10(v) if self.log else v
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def ticks(self):
        if self.log:
            return _log_ticks(10 ** self.lo, 10 ** self.hi)
        return _linear_ticks(self.lo, self.hi)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pillow < 10.1 or without FreeType: the small bitmap font
        return ImageFont.load_default()


def _draw_panel(draw, box, title, lines, x_axis_values, fonts):
    """One panel in box = (x0, y0): grid, ticks, lines, legend; returns (its title as drawn, the plot area)."""
    x0, y0 = box
    area = (x0 + LEFT, y0 + TOP, x0 + PANEL_W - RIGHT, y0 + PANEL_H - BOTTOM)
    values = np.concatenate([v[np.isfinite(v)] for _, _, v in lines] or [np.zeros(0)])
    log = values.size > 1 and values.min() > 0 and values.max() / values.min() > 10
    title += " (log scale)" if log else ""
    draw.text((x0 + LEFT, y0 + 8), title, fill=TEXT, font=fonts[1])
    if values.size == 0:
        draw.text((area[0] + 10, (area[1] + area[3]) // 2), "no finite values yet", fill=AXIS, font=fonts[0])
        draw.rectangle(area, outline=AXIS)
        return title, area
    fx, fy = Axis(x_axis_values, area[0], area[2]), Axis(values, area[3], area[1], log)
    for t in fx.ticks():
        px = fx(t)
        if area[0] <= px <= area[2]:
            draw.line((px, area[1], px, area[3]), fill=GRID)
            draw.text((px, area[3] + 4), _label(t), fill=TEXT, font=fonts[0], anchor="ma")
    for t in fy.ticks():
        py = fy(t)
        if area[1] <= py <= area[3]:
            draw.line((area[0], py, area[2], py), fill=GRID)
            draw.text((area[0] - 4, py), _label(t), fill=TEXT, font=fonts[0], anchor="rm")
    draw.text(((area[0] + area[2]) // 2, area[3] + 18), "kimg", fill=AXIS, font=fonts[0], anchor="ma")
    draw.rectangle(area, outline=AXIS)
    for i, (_, x, v) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        ok = np.isfinite(v) & ((v > 0) if log else True)
        points = [(float(fx(a)), float(fy(b))) if good else None for a, b, good in zip(x, v, ok)]
        segment = []
        for p in points + [None]:  # a non-finite value breaks the line
            if p is not None:
                segment.append(p)
                continue
            if len(segment) > 1:
                draw.line(segment, fill=color, width=2, joint="curve")
            if len(segment) == 1 or len(segment) > 1 and len(points) <= 12:  # few points (FID): mark each
                for px, py in segment:
                    draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
            segment = []
    if len(lines) > 1:  # the legend, top right, over the lines
        width = max(draw.textlength(label, font=fonts[0]) for label, _, _ in lines)
        x, y = area[2] - width - 30, area[1] + 4
        draw.rectangle((x - 4, y, area[2] - 4, y + 4 + 14 * len(lines)), fill="white", outline=GRID)
        for i, (label, _, _) in enumerate(lines):
            draw.line((x, y + 9 + 14 * i, x + 16, y + 9 + 14 * i), fill=COLORS[i % len(COLORS)], width=2)
            draw.text((x + 20, y + 3 + 14 * i), label, fill=TEXT, font=fonts[0])
    return title, area


def render(records, title=""):
    """(the picture, [(panel title as drawn, plot area (x0, y0, x1, y1))]) of the records of a metrics.jsonl."""
    panels = panels_of(records)
    cols = 3 if len(panels) <= 6 else 4
    rows = math.ceil(len(panels) / cols)
    image = Image.new("RGB", (cols * PANEL_W, HEADER + rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    fonts = (_font(11), _font(13), _font(15))
    draw.text((10, 7), title, fill=TEXT, font=fonts[2])
    draw.text((image.width - 10, 9), "kimg: thousands of training images seen", fill=AXIS, font=fonts[1], anchor="ra")
    kimg = np.array([float(r["kimg"]) for r in records] or [0.0])
    x_range = np.array([min(0.0, kimg.min()), kimg.max()])  # every panel on the same kimg axis, from 0
    drawn = []
    for i, (name, lines) in enumerate(panels):
        box = (i % cols * PANEL_W, HEADER + i // cols * PANEL_H)
        drawn.append(_draw_panel(draw, box, name, lines, x_range, fonts))
    return image, drawn


def save(metrics_path, png_path, title=""):
    """Draw metrics_path into png_path, through png_path.tmp renamed over it (a kill leaves the old picture or the
    new one). Returns the number of records drawn."""
    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    image, _ = render(records, title)
    # 64 colours: the lines, the greys and the text's edges; a quarter of the RGB file's size.
    image = image.quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = png_path + ".tmp"
    try:
        image.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(records)
