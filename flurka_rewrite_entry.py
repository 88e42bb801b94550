"""The ``flurka-rewrite`` console script: Ctrl-C or SIGTERM while torch is still being
imported (seconds) ends the process with one line and exit code 130 / 143, not a traceback.
Kept outside the ``flurka_rewrite`` package, whose import is the slow part."""
from __future__ import annotations

import signal
import sys

_got: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    _got.append(signum)
    raise KeyboardInterrupt


def main() -> int:
    """Install the signal handling, import the CLI, run it."""
    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        from flurka_rewrite.cli import main as cli_main
    except KeyboardInterrupt:
        term = signal.SIGTERM in _got
        print("flurka-rewrite: " + ("terminated (SIGTERM)" if term else "interrupted")
              + " while starting; nothing was written", file=sys.stderr)
        return 143 if term else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
