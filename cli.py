"""What the commands share (train.py, fid.py, convert.py): the one-line error for bad input and run_main, which
reports it and ends a torchrun rank, flag parsers, the device flag and the process group. It imports nothing of the
project.
"""
import argparse
import os
import re
import sys

import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input: reported as one line and exit status 1, before anything is written."""


def report_errors(main, prog, errors, argv):
    try:
        return main(argv)
    except errors as e:
        sys.exit(f"{prog}: error: {e}")


def run_main(main, prog, errors, argv=None):
    """main(argv), with the exceptions in `errors` reported as one line on stderr ("PROG: error: ...") and exit
    status 1; anything else keeps its traceback. A torchrun rank (RANK set) leaves through os._exit once main() has
    returned or exited: interpreter teardown would free whatever still holds the Gloo process group's threads (its C++
    objects outlive destroy_process_group while anything references them), and a thread destroyed unjoined there
    aborts the rank ("terminate called without an active exception") after its work is done."""
    if "RANK" not in os.environ:
        return report_errors(main, prog, errors, argv)
    try:
        report_errors(main, prog, errors, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1 if code else 0)


def parse_as(kind):
    """argparse type for a flag whose value has type `kind` (bool and comma-separated tuples included)."""
    def parse(text):
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if kind is tuple:
            return tuple(float(v) for v in text.split(",") if v)
        return kind(text)
    return parse


def check_device(flag):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", flag):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")


def setup_distributed(device_flag):
    """(ddp, rank, world, device). Under torchrun the device is cuda:LOCAL_RANK; --device cuda:N picks GPU N alone."""
    check_device(device_flag)
    ddp = "RANK" in os.environ
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {device_flag} but CUDA is not available")
    if device_flag.startswith("cuda:") and not ddp:
        local = int(device_flag[5:])
        if local >= torch.cuda.device_count():
            raise UsageError(f"--device {device_flag}, but there are {torch.cuda.device_count()} GPUs")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return ddp, rank, world, device

