"""``python -m flurka_rewrite``: the ``flurka-rewrite`` command (flurka_rewrite/cli.py)."""
import sys

from flurka_rewrite.cli import main

if __name__ == "__main__":
    sys.exit(main())
