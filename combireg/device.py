"""Which torch device a command runs on: ``auto``, ``cpu`` or ``cuda`` (``--device``).

One small module rather than a function in ``optimize.py`` or ``batch.py``: the CLI commands
(``run``, ``train``, ``batch``), the batch workers and any library caller resolve a device the
same way, and none of them should import the optimiser or dask for it.
"""
from __future__ import annotations

import logging

import torch

from .errors import CombiregError

__all__ = ["DEVICE_CHOICES", "DEVICE_HELP", "resolve_device"]

log = logging.getLogger(__name__)

#: What ``--device`` accepts (``cuda:N`` picks one GPU of several).
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: The help text of the commands' ``--device`` option.
DEVICE_HELP = "torch device: auto (CUDA when available, else the CPU; logged with -v), cpu, cuda or cuda:N."


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` stands for.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "cuda:N"}, torch.device or None
        ``"auto"`` (and None) is CUDA when ``torch.cuda.is_available()``, else the CPU; the
        choice is logged (INFO).

    Returns
    -------
    torch.device

    Raises
    ------
    CombiregError
        CUDA asked for where there is none (or no GPU with that index), or an unknown name.
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("--device auto: using %s%s", device.type,
                 "" if device.type == "cuda" else " (torch sees no CUDA device)")
        return device
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise CombiregError(f"--device {name!r}: expected cuda or cuda:N") from None
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise CombiregError(f"--device {name} requested but no CUDA device is available ({build}); "
                                f"use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CombiregError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise CombiregError(f"--device {name!r}: expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
