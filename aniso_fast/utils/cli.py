"""What every command-line tool of the package shares: a parser whose usage errors raise instead of exiting, so
that each `main()` reports every bad input alike, as one line `error: --option: ...` and exit code 2."""
from __future__ import annotations

import argparse

__all__ = ["Parser"]


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as ValueError("--option: ...") (argparse's "argument " prefix dropped)."""

    def error(self, message):
        raise ValueError(message.removeprefix("argument "))
