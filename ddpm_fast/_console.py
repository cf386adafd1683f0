"""What every command line of the package shares: one-line mistakes, one-line warnings."""

from __future__ import annotations

import argparse
import sys
import warnings


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line on stderr (``prog: message``) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def one_line_warnings() -> None:
    """Warnings as ``warning: message`` lines, without the file and source line."""
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)


# the errors a user's mistake or a bad file raises: one line, no traceback
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
