"""Argument types shared by the CLI commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An ``int`` >= 1, for argparse ``type=``."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
