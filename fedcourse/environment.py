"""What lesson 00 checks about the machine a student runs the course on."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    """Versions, compute device and the embedded data, as name -> text."""
    from . import __version__
    from .mnist import load_mnist

    try:
        train, test = load_mnist("train"), load_mnist("test")
        data = f"ok ({len(train)} training and {len(test)} test digits, checksums verified)"
    except Exception as exc:  # the report must show the problem, not stop at it
        data = f"PROBLEM: {exc}"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "cpu (no GPU found; every lesson runs on a CPU within its budget)"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "fedcourse": __version__,
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "device": device,
        "mnist sample": data,
    }


def print_environment_report() -> dict[str, str]:
    report = environment_report()
    width = max(len(name) for name in report)
    for name, value in report.items():
        print(f"{name:<{width}}  {value}")
    return report
