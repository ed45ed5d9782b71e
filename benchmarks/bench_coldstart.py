"""Cold start: seconds from ``python app.py`` to the first answered ``/explain`` request.

A thin entry point for ``bench_server.py --cold-start-only``: it starts the app ``--starts``
times with the background warm-up (the default) and as many times without it
(``CBAM_VIZ_WARMUP=0``), and prints the medians plus request 1 vs request 2 (client-side and the
server's own ``analyse`` seconds): without the warm-up request 1 pays the lazy model load and
first-call costs, request 2 does not, which shows the models load once per process.

Usage::

    python benchmarks/bench_coldstart.py --starts 3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--cold-start-only", *sys.argv[1:]]))
