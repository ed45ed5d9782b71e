"""Benchmark: what serving adds to one explanation, as a caller of the API feels it (issue 28).

One user, sequential requests, against ``python app.py`` started as a user starts it
(:func:`bench_server.start_server`), all in one run:

* **floor**: ``/info`` through ``gradio_client``: Gradio's own cost of one call (queue, SSE, JSON);
* **request**: ``/explain`` with the photo uploaded, the files it returns not fetched;
* **round trip**: ``/explain`` with every returned file fetched over HTTP, as a caller does;
* **in-process**: :func:`cbam_viz.service.analyse` of the same photo with the same lineup and
  pictures, in this process (the analysis alone, no server).

Printed: the p50 of each, what serving adds (round trip minus in-process) and its ratio to the floor
(the target: at most 1.5x). Usage::

    python benchmarks/bench_roundtrip.py                 # 9 requests after warm-up, the shipped photo
    python benchmarks/bench_roundtrip.py --requests 15 --photo path/to/photo.jpg
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # cbam_viz from this checkout
from bench_server import ROOT, start_server, stop_server, wait_http  # noqa: E402

TARGET = 1.5


def _files_of(result) -> list[str]:
    """Every file path or URL in a gradio_client result (galleries, file lists, single files)."""
    out: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for key in ("path", "url"):
                if isinstance(value.get(key), str) and key == "path":
                    out.append(value[key])
                    return
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith(("/", "http")) and Path(value).suffix:
            out.append(value)

    for part in (result[1:] if isinstance(result, (list, tuple)) else []):
        walk(part)
    return out


def _timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(url: str, photo: Path, n: int) -> dict:
    """p50 seconds of the four ways, same photo, same lineup (the app's default)."""
    from gradio_client import Client, handle_file

    from cbam_viz import service

    lean = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    fetching = Client(url, verbose=False, download_files=tempfile.mkdtemp(), analytics_enabled=False)
    info = lambda: lean.predict(api_name="/info")  # noqa: E731
    request = lambda: lean.predict(image=handle_file(str(photo)), api_name="/explain")  # noqa: E731
    files: list[int] = []
    round_trip = lambda: files.append(len(_files_of(  # noqa: E731
        fetching.predict(image=handle_file(str(photo)), api_name="/explain"))))
    lineup = service.get_lineup(None)
    in_process = lambda: service.analyse(str(photo), lineup=lineup, pictures=service.API_PICTURES)  # noqa: E731
    for fn in (info, request, round_trip, in_process):  # warm-up: lazy imports, first allocations
        fn()
    rounds = {name: [] for name in ("floor", "request", "round_trip", "in_process")}
    for _ in range(n):  # interleaved, so a noisy neighbour slows each alike
        for name, fn in (("floor", info), ("request", request), ("round_trip", round_trip),
                         ("in_process", in_process)):
            rounds[name] += _timed(fn, 1)
    p50 = {k: statistics.median(v) for k, v in rounds.items()}
    added = p50["round_trip"] - p50["in_process"]
    return {"p50_s": p50, "files_returned": files[-1] if files else 0, "serving_added_s": added,
            "ratio_to_floor": added / p50["floor"], "requests": n, "lineup": lineup.name,
            "members": lineup.names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=9)
    p.add_argument("--photo", type=Path, help="default: the shipped Imagenette example church.JPEG")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    photo = args.photo or ROOT / "examples" / "imagenette" / "church.JPEG"
    if not photo.is_file():
        raise SystemExit(f"no photo {photo}: pass --photo")
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(concurrency=None, workdir=Path(tmp))
        try:
            wait_http(server, 180)
            result = measure(server.url, photo, args.requests)
        finally:
            stop_server(server)
    p50 = result["p50_s"]
    print(f"lineup {result['lineup']} ({len(result['members'])} models), photo {photo.name}, "
          f"{args.requests} requests each, p50:")
    print(f"  /info (Gradio's floor)                 {p50['floor'] * 1000:7.0f} ms")
    print(f"  /explain, files not fetched            {p50['request'] * 1000:7.0f} ms")
    print(f"  /explain, {result['files_returned']} returned files fetched   {p50['round_trip'] * 1000:7.0f} ms")
    print(f"  service.analyse in-process             {p50['in_process'] * 1000:7.0f} ms")
    print(f"  serving adds {result['serving_added_s'] * 1000:.0f} ms = {result['ratio_to_floor']:.2f}x the floor "
          f"(target <= {TARGET}x): {'met' if result['ratio_to_floor'] <= TARGET else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
