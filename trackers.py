"""TensorBoard and Weights & Biases for train.py's --tensorboard and --wandb: the scalars of every metrics.jsonl record
(loss_by_t's bins as loss_by_t/BIN) at its step, and the --sample-every pictures. Rank 0 logs; the packages are
optional and imported only when their flag is given, by check() before the run folder is created.

    --tensorboard           OUT/tensorboard/ event files (tensorboard --logdir OUT)
    --wandb [online]        a W&B run in project $WANDB_PROJECT (default flowmaps) named after OUT, files in OUT/wandb/
    --wandb offline         the same without a network (or WANDB_MODE=offline); upload it later: wandb sync OUT/wandb/
"""
import contextlib
import importlib
import os

import numpy as np
from PIL import Image

from cli import UsageError


def _import(package):
    """The module the flag --PACKAGE logs with (torch's SummaryWriter for tensorboard), or a one-line UsageError with
    the install line."""
    try:
        importlib.import_module(package)  # first: torch.utils.tensorboard, once imported, no longer looks for it
        return importlib.import_module("torch.utils.tensorboard" if package == "tensorboard" else package)
    except ImportError:
        raise UsageError(f"--{package} needs the {package} package: pip install {package}") from None


def check(tensorboard, wandb):
    """The packages the flags need are importable (else a one-line UsageError with the install line)."""
    if tensorboard:
        _import("tensorboard")
    if wandb:
        _import("wandb")


def flat_scalars(record):
    """{name: float} of a metrics record's numbers, dicts flattened as key/subkey; the step is the x axis, not a
    scalar."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if _is_number(vv)})
        elif k != "step" and _is_number(v):
            out[k] = float(v)
    return out


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Trackers:
    """The open loggers (none on ranks other than 0, or without the flags); every method is a no-op without them."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def log(self, record):
        scalars, step = flat_scalars(record), record["step"]
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()  # a few lines per log interval: the events are on disk if the run is killed
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def picture(self, name, path, step):
        """A PNG written by the run (data.save_picture) under `name` at `step`."""
        if self.tensorboard is not None:
            with Image.open(path) as image:
                self.tensorboard.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb_run is not None:
            wandb = importlib.import_module("wandb")
            self.wandb_run.log({name: wandb.Image(path)}, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            # finish() may return before W&B's service process has written the run's file (offline: a 7-byte header
            # in 2 of 6 tries with wandb 0.31); teardown waits for that process to end.
            importlib.import_module("wandb").teardown()


@contextlib.contextmanager
def opened(tensorboard, wandb, out, cfg, rank):
    """Trackers for the run folder `out` (empty on ranks other than 0), closed on exit."""
    trackers = Trackers()
    if rank == 0 and tensorboard:
        trackers.tensorboard = _import("tensorboard").SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
    if rank == 0 and wandb:
        mode = None if wandb is True else wandb  # None: W&B's own choice, WANDB_MODE or online
        module = _import("wandb")
        try:
            trackers.wandb_run = module.init(
                project=os.environ.get("WANDB_PROJECT", "flowmaps"), name=os.path.basename(os.path.normpath(out)),
                dir=out, mode=mode, config=cfg, settings=module.Settings(console="off"))
        except Exception as e:  # no network, no login, ...: W&B's own exception types
            trackers.close()
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--wandb: W&B did not start ({why}); --wandb offline needs no network or login") from None
    try:
        yield trackers
    finally:
        trackers.close()
