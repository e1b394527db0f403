"""``python -m explainer`` (and the ``explainer`` console script): the command line.

``explainer batch`` explains a folder of images into a results store (locally or on Ray);
``explainer top`` ranks a store's images by one channel. See :mod:`explainer.batch.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return its status."""
    from explainer.batch.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
