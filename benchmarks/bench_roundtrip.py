"""Benchmark: what serving adds to one explanation, as a caller of the API feels it (issue 28).

One user, sequential requests, against ``python app.py`` started as a user starts it
(:func:`bench_server.start_server`), all in one run:

* **floor**: ``/info`` through ``gradio_client``: Gradio's own cost of one call (queue, SSE, JSON);
* **request**: ``/explain`` with the photo uploaded, the files it returns not fetched;
* **round trip**: ``/explain`` with every returned file fetched over HTTP and every picture it
  carries inline (data URIs) decoded, as a caller does;
* **in-process**: :func:`cbam_viz.service.analyse` of the same photo with the same lineup and
  pictures, in this process (the analysis alone, no server).

Printed: the p50 of each, what serving adds (round trip minus in-process) and its ratio to the floor
(the target: at most 1.5x); and the same paired per request (each round trip minus the server's own
``analyse`` time of that request, ``timings.total`` of its JSON), which a busy machine disturbs less
than a difference of two medians taken in two processes. Usage::

    python benchmarks/bench_roundtrip.py                 # 9 requests after warm-up, the shipped photo
    python benchmarks/bench_roundtrip.py --requests 15 --photo path/to/photo.jpg
    python benchmarks/bench_roundtrip.py --apps app.py /tmp/old/app.py --labels new old   # side by side
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # cbam_viz from this checkout
from bench_server import APP, ROOT, start_server, stop_server, wait_http  # noqa: E402

TARGET = 1.5


def _files_of(result) -> list[str]:
    """Every file path or URL in a gradio_client result (galleries, file lists, single files)."""
    out: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                out.append(value["path"])
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


def _inline_pictures(result) -> list[bytes]:
    """The pictures a result carries inside its JSON (``data:image/...;base64,`` strings), decoded."""
    out: list[bytes] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("data:image/"):
            out.append(base64.b64decode(value.split(",", 1)[1]))

    walk(list(result) if isinstance(result, (list, tuple)) else [result])
    return out


def _timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _app_calls(url: str, photo: Path) -> tuple[dict, list]:
    """The three timed calls against one server: floor, request (files not fetched), round trip."""
    from gradio_client import Client, handle_file

    lean = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    fetching = Client(url, verbose=False, download_files=tempfile.mkdtemp(), analytics_enabled=False)
    got: list[tuple[int, int, int, float]] = []  # (files, inline pictures, their bytes, seconds) per answer

    def round_trip() -> None:
        t = time.perf_counter()
        result = fetching.predict(image=handle_file(str(photo)), api_name="/explain")
        inline = _inline_pictures(result)  # decoded, as a caller does before using them
        # What serving added to this very request: its round trip minus the server's own analysis of it.
        added = time.perf_counter() - t - float(result[0]["timings"]["total"])
        got.append((len(_files_of(result)), len(inline), sum(map(len, inline)), added))

    calls = {"floor": lambda: lean.predict(api_name="/info"),
             "request": lambda: lean.predict(image=handle_file(str(photo)), api_name="/explain"),
             "round_trip": round_trip}
    return calls, got


def measure(urls: dict[str, str], photo: Path, n: int) -> dict[str, dict]:
    """p50 seconds of the four ways per app (label -> url), same photo, same lineup (the app's default);
    the calls of every app and the in-process analysis interleaved, so a noisy neighbour slows each alike."""
    from cbam_viz import service

    lineup = service.get_lineup(None)
    in_process = lambda: service.analyse(str(photo), lineup=lineup, pictures=service.API_PICTURES)  # noqa: E731
    apps = {label: _app_calls(url, photo) for label, url in urls.items()}
    for calls, _ in apps.values():  # warm-up: lazy imports, first allocations
        for fn in calls.values():
            fn()
    in_process()
    rounds = {label: {name: [] for name in ("floor", "request", "round_trip")} for label in apps}
    ours: list[float] = []
    for _ in range(n):
        for label, (calls, _) in apps.items():
            for name, fn in calls.items():
                rounds[label][name] += _timed(fn, 1)
        ours += _timed(in_process, 1)
    out = {}
    for label, (_, got) in apps.items():
        p50 = {k: statistics.median(v) for k, v in rounds[label].items()}
        p50["in_process"] = statistics.median(ours)
        added = p50["round_trip"] - p50["in_process"]
        fetched, inline, inline_bytes, _ = got[-1]
        paired = statistics.median(g[3] for g in got[-n:])
        out[label] = {"p50_s": p50, "files_returned": fetched, "inline_pictures": inline,
                      "inline_bytes": inline_bytes, "serving_added_s": added, "ratio_to_floor": added / p50["floor"],
                      "paired_added_s": paired, "paired_ratio_to_floor": paired / p50["floor"],
                      "requests": n, "lineup": lineup.name, "members": lineup.names}
    return out


def _print(label: str, result: dict, photo: Path) -> None:
    p50 = result["p50_s"]
    print(f"{label}: lineup {result['lineup']} ({len(result['members'])} models), photo {photo.name}, "
          f"{result['requests']} requests each, p50:")
    print(f"  /info (Gradio's floor)                 {p50['floor'] * 1000:7.0f} ms")
    print(f"  /explain, files not fetched            {p50['request'] * 1000:7.0f} ms")
    got = (f"{result['files_returned']} files fetched, {result['inline_pictures']} inline pictures "
           f"({result['inline_bytes'] / 1024:.0f} KiB) decoded")
    print(f"  /explain, all it returns ({got}) {p50['round_trip'] * 1000:7.0f} ms")
    print(f"  service.analyse in-process             {p50['in_process'] * 1000:7.0f} ms")
    verdict = ("no verdict: the analysis alone took longer than the whole round trip (a busy machine)"
               if result["serving_added_s"] < 0 else "met" if result["ratio_to_floor"] <= TARGET else "NOT met")
    print(f"  serving adds {result['serving_added_s'] * 1000:.0f} ms = {result['ratio_to_floor']:.2f}x the floor "
          f"(target <= {TARGET}x): {verdict}")
    print(f"  paired, per request (round trip - the server's own analysis of it, from its JSON): "
          f"{result['paired_added_s'] * 1000:.0f} ms = {result['paired_ratio_to_floor']:.2f}x the floor: "
          f"{'met' if result['paired_ratio_to_floor'] <= TARGET else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=9)
    p.add_argument("--photo", type=Path, help="default: the shipped Imagenette example church.JPEG")
    p.add_argument("--apps", type=Path, nargs="+", default=[APP],
                   help="app.py files to compare side by side (e.g. an old worktree's); default this checkout's")
    p.add_argument("--labels", nargs="+", help="a name per app (default: app1, app2, ...)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    photo = args.photo or ROOT / "examples" / "imagenette" / "church.JPEG"
    if not photo.is_file():
        raise SystemExit(f"no photo {photo}: pass --photo")
    labels = args.labels or [f"app{i + 1}" for i in range(len(args.apps))]
    if len(labels) != len(args.apps):
        raise SystemExit(f"{len(labels)} labels for {len(args.apps)} apps")
    with tempfile.TemporaryDirectory() as tmp:
        servers = {label: start_server(concurrency=None, workdir=Path(tmp), app=app)
                   for label, app in zip(labels, args.apps)}
        try:
            for server in servers.values():
                wait_http(server, 300)
            results = measure({label: s.url for label, s in servers.items()}, photo, args.requests)
        finally:
            for server in servers.values():
                stop_server(server)
    for label, result in results.items():
        _print(label, result, photo)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
