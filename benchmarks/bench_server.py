"""Benchmark 2, the server: cold start and load through ``gradio_client``, as a user runs the app.

For each queue concurrency (``--server-concurrency``, passed as ``CBAM_VIZ_CONCURRENCY``, which
``app.py`` reads) this script starts ``python app.py`` on a free loopback port, exactly as a user
would (its own temp folder, analytics off), and measures:

* **cold start**: seconds from spawning ``python app.py`` to the first HTTP answer, and to the
  first answered ``/explain`` request; then request 1 vs request 2 latency, client-side and as
  the server's own ``analyse`` total from the JSON summary (models load once per process, at
  start-up or lazily on the first request, never per request: request 2 carries no load cost);
* **load**: ``--requests`` explanation requests at each client concurrency (``--concurrency``,
  one thread and one ``gradio_client.Client`` per concurrent user), bounded by
  ``--max-seconds`` per level and ``--request-timeout`` per request. Printed: throughput,
  p50/p95/p99 latency, errors (must be 0), lost requests (submitted but never answered within
  the timeout, must be 0), how many request folders the server actually wrote, the server's CPU
  seconds per request, and its peak RSS (``VmHWM`` of the server process, cumulative since start).

Clients do not download the result files (``download_files=False``): on a 2-core machine the
load generator shares the CPU with the server, so it does the least it can; the server still
computes, renders and writes every file of every request.

Comparing two versions of the app in one run (``--apps NEW OLD --labels new old``): every app
is started side by side (each from its own folder, so each imports its own ``cbam_viz``), and at
each load level the apps take turns, the first one rotating, so that a noisy neighbour (a
training run on the same cores) slows them alike; the throughput ratio of the first app over
each other one is printed per level. An old commit to compare with is checked out with
``git worktree add /tmp/old <commit>`` (and removed with ``git worktree remove /tmp/old``).

Usage::

    python benchmarks/bench_server.py                                   # 200 requests x 1/4/8 users, queue 2
    python benchmarks/bench_server.py --apps app.py /tmp/old/app.py --labels new old   # old vs new
    python benchmarks/bench_server.py --server-concurrency 1 2 4        # choose the queue width
    python benchmarks/bench_server.py --requests 20 --concurrency 1 4   # a quick run
    python benchmarks/bench_server.py --cold-start-only --starts 3      # cold start alone (bench_coldstart.py)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
API = "/explain"
COLD_START_TARGET_S = 6.0  # issue 14: python app.py to the first answered /explain (was 10 s before)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    tmp: Path
    log: Path
    started: float                      # perf_counter just before spawning
    http_ready: float = 0.0             # perf_counter of the first HTTP 200

    def status_kib(self, key: str) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) if m else 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime, all threads

    def request_dirs(self) -> int:
        # the app's request folders (cbam_viz.outputs.OUTPUT_ROOT under its TMPDIR; an older app, compared
        # side by side, writes them under "cbam_viz")
        return sum(len(list((self.tmp / folder).glob("req-*"))) for folder in ("cbam-viz-results", "cbam_viz"))

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_server(*, concurrency: int | None, env: dict[str, str] | None = None, workdir: Path,
                 app: Path = APP) -> Server:
    """``python app.py`` on 127.0.0.1:<free port>, in its own session and temp folder (cwd: the app's folder)."""
    port = free_port()
    tmp = workdir / f"server-{port}"
    (tmp / "gradio").mkdir(parents=True)
    child_env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "TMPDIR": str(tmp),                 # the app's request folders (tempfile.gettempdir())
        "PYTHONUNBUFFERED": "1",
        **({"CBAM_VIZ_CONCURRENCY": str(concurrency)} if concurrency else {}),
        **(env or {}),
    }
    log = tmp / "server.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(app)], cwd=Path(app).resolve().parent, env=child_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc=proc, url=f"http://127.0.0.1:{port}", tmp=tmp, log=log, started=started)


def wait_http(server: Server, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/", timeout=5) as resp:
                if resp.status == 200:
                    server.http_ready = time.perf_counter()
                    return server.http_ready - server.started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"app.py did not answer within {timeout:.0f}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group (only the one we started), SIGKILL after 10 s."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------- client


def make_images(folder: Path, n: int = 4) -> list[Path]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_explain import make_image

    paths = []
    for i in range(n):
        path = folder / f"photo_{i}.jpg"
        make_image(seed=100 + i).save(path, quality=90)
        paths.append(path)
    return paths


def new_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


def explain_once(client, image: Path, timeout: float):
    from gradio_client import handle_file

    return client.submit(image=handle_file(str(image)), api_name=API).result(timeout=timeout)


def _server_total_s(result) -> float | None:
    """Seconds the server's ``analyse`` took for this request (from the JSON summary it returns)."""
    summary = result[0] if isinstance(result, (list, tuple)) else result
    try:
        return float(summary["timings"]["total"])
    except (KeyError, TypeError, ValueError):
        return None


def cold_start(server: Server, image: Path, *, timeout: float) -> dict:
    """Spawn -> first HTTP answer -> first /explain answered; then request 1 vs request 2."""
    http_s = wait_http(server, timeout)
    client = new_client(server.url)
    t1 = time.perf_counter()
    r1 = explain_once(client, image, timeout)
    t_first = time.perf_counter()
    r2 = explain_once(client, image, timeout)
    t2 = time.perf_counter()
    return {
        "http_ready_s": http_s,
        "first_answer_s": t_first - server.started,
        "request1_s": t_first - t1,
        "request2_s": t2 - t_first,
        "request1_server_s": _server_total_s(r1),
        "request2_server_s": _server_total_s(r2),
        "rss_after_start_mib": server.status_kib("VmRSS") / 1024,
    }


@dataclass
class LevelResult:
    users: int
    submitted: int = 0
    ok: int = 0
    errors: int = 0
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def load_level(server: Server, images: list[Path], *, users: int, requests: int, max_seconds: float,
               request_timeout: float) -> LevelResult:
    """``requests`` explanations from ``users`` threads (own client each), bounded in time."""
    res = LevelResult(users=users)
    lock = threading.Lock()
    counter = iter(range(requests))
    clients = [new_client(server.url) for _ in range(users)]
    deadline = time.monotonic() + max_seconds

    def worker(client) -> None:
        from concurrent.futures import TimeoutError as FutureTimeout

        while True:
            with lock:
                i = next(counter, None)
                if i is None or time.monotonic() > deadline:
                    return
                res.submitted += 1
            t = time.perf_counter()
            try:
                explain_once(client, images[i % len(images)], request_timeout)
            except (TimeoutError, FutureTimeout):
                with lock:
                    res.lost += 1
                continue
            except Exception as err:  # noqa: BLE001  counted and reported
                with lock:
                    res.errors += 1
                    if len(res.error_messages) < 5:
                        res.error_messages.append(f"{type(err).__name__}: {err}"[:300])
                continue
            dt = time.perf_counter() - t
            with lock:
                res.ok += 1
                res.latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=users) as pool:
        for fut in [pool.submit(worker, c) for c in clients]:
            fut.result()
    res.wall_s = time.perf_counter() - t0
    for c in clients:
        with contextlib.suppress(Exception):
            c.close()
    return res


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# ------------------------------------------------------------------------------------- modes


def _level(server: Server, images: list[Path], users: int, args) -> dict:
    dirs0, cpu0 = server.request_dirs(), server.cpu_seconds()
    r = load_level(server, images, users=users, requests=args.requests, max_seconds=args.max_seconds,
                   request_timeout=args.request_timeout)
    processed = server.request_dirs() - dirs0
    cpu = server.cpu_seconds() - cpu0
    lat = r.latencies
    return {
        "users": users, "submitted": r.submitted, "ok": r.ok, "errors": r.errors, "lost": r.lost,
        "server_processed": processed, "wall_s": r.wall_s,
        "throughput_rps": r.ok / r.wall_s if r.wall_s else 0.0,
        "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "p99_s": _pct(lat, 99),
        "mean_s": statistics.fmean(lat) if lat else float("nan"),
        "server_cpu_s_per_request": cpu / max(1, processed), "peak_rss_mib": server.status_kib("VmHWM") / 1024,
        "error_messages": r.error_messages,
    }


def run_config(concurrency: int | None, args, workdir: Path, images: list[Path]) -> list[dict]:
    """Every app of ``--apps`` at one queue concurrency; at each load level the apps take turns."""
    label = concurrency if concurrency else "app default"
    servers = {name: start_server(concurrency=concurrency, workdir=workdir, app=app)
               for name, app in zip(args.labels, args.apps)}
    outs = {name: {"app": name, "app_path": str(app), "server_concurrency": concurrency, "levels": []}
            for name, app in zip(args.labels, args.apps)}
    try:
        for name, server in servers.items():
            cs = cold_start(server, images[0], timeout=args.start_timeout)
            outs[name]["cold_start"] = cs
            print(f"\n== {name}: server CBAM_VIZ_CONCURRENCY={label} (pid {server.proc.pid}) ==")
            print(f"cold start: HTTP answers after {cs['http_ready_s']:.2f} s; first /explain answered "
                  f"{cs['first_answer_s']:.2f} s after `python app.py`")
            print(f"request 1 {cs['request1_s']:.3f} s (server analyse {cs['request1_server_s']:.3f} s), "
                  f"request 2 {cs['request2_s']:.3f} s (server analyse {cs['request2_server_s']:.3f} s)")
        names = list(servers)
        for k, users in enumerate(args.concurrency):
            for name in names[k % len(names):] + names[:k % len(names)]:
                level = _level(servers[name], images, users, args)
                outs[name]["levels"].append(level)
                tag = f"{name}: " if len(names) > 1 else ""
                print(f"{tag}queue={label} users={users}: {level['ok']}/{level['submitted']} ok in "
                      f"{level['wall_s']:.1f} s, throughput {level['throughput_rps']:.2f} req/s, latency p50 "
                      f"{level['p50_s']:.3f} s p95 {level['p95_s']:.3f} s p99 {level['p99_s']:.3f} s, errors "
                      f"{level['errors']}, lost {level['lost']}, server wrote {level['server_processed']}, server CPU "
                      f"{level['server_cpu_s_per_request']:.3f} s/request, peak RSS {level['peak_rss_mib']:.0f} MiB")
                for msg in level["error_messages"]:
                    print(f"   error: {msg}")
                if level["submitted"] < args.requests:
                    print(f"   (stopped after {args.max_seconds:.0f} s: {level['submitted']} of {args.requests} "
                          "submitted)")
            first = outs[names[0]]["levels"][-1]
            for other in names[1:]:
                o = outs[other]["levels"][-1]
                if o["throughput_rps"]:
                    print(f"ratio users={users} throughput {names[0]}/{other} = "
                          f"{first['throughput_rps'] / o['throughput_rps']:.2f}, p50 {names[0]}/{other} = "
                          f"{first['p50_s'] / o['p50_s']:.2f}")
    finally:
        for name, server in servers.items():
            stop_server(server)
            outs[name]["server_log_tail"] = server.log_tail(15)
            shutil.rmtree(server.tmp, ignore_errors=True)
    return list(outs.values())


def run_cold(args, workdir: Path, images: list[Path]) -> dict:
    """Cold start alone, ``--starts`` times with the app's warm-up and ``--starts`` without."""
    results = {}
    for warm in ("1", "0"):
        runs = []
        for _ in range(args.starts):
            server = start_server(concurrency=None, env={"CBAM_VIZ_WARMUP": warm}, workdir=workdir)
            try:
                runs.append(cold_start(server, images[0], timeout=args.start_timeout))
            finally:
                stop_server(server)
                shutil.rmtree(server.tmp, ignore_errors=True)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}
        results["warmup" if warm == "1" else "no_warmup"] = {"runs": runs, "median": med}
        print(f"cold start (CBAM_VIZ_WARMUP={warm}, median of {len(runs)}): HTTP {med['http_ready_s']:.2f} s, "
              f"first /explain answered {med['first_answer_s']:.2f} s (target <= {COLD_START_TARGET_S:g} s: "
              f"{'MET' if med['first_answer_s'] <= COLD_START_TARGET_S else 'MISSED'}); request 1 {med['request1_s']:.3f} s, "
              f"request 2 {med['request2_s']:.3f} s (server analyse {med['request1_server_s']:.3f} s vs "
              f"{med['request2_server_s']:.3f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=200, help="requests per client-concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="concurrent users (threads)")
    p.add_argument("--server-concurrency", type=int, nargs="+", default=[2],
                   help="CBAM_VIZ_CONCURRENCY values to start the app with (0: the app's default)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time bound per level")
    p.add_argument("--request-timeout", type=float, default=120.0, help="a request unanswered by then is lost")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--cold-start-only", action="store_true")
    p.add_argument("--starts", type=int, default=3, help="cold starts per setting (--cold-start-only)")
    p.add_argument("--apps", type=Path, nargs="+", default=[APP],
                   help="app.py files to start side by side (e.g. this one and an old worktree's)")
    p.add_argument("--labels", nargs="+", help="a name per --apps entry (default: new, old, old2, ...)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.labels is None:
        args.labels = ["new", *[f"old{i if i > 1 else ''}" for i in range(1, len(args.apps))]][:len(args.apps)]
    if len(args.labels) != len(args.apps) or len(set(args.labels)) != len(args.labels):
        p.error("--labels needs one distinct name per --apps entry")

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        workdir = Path(tmp)
        images = make_images(workdir)
        if args.cold_start_only:
            results = {"cold_start": run_cold(args, workdir, images)}
        else:
            results = {"configs": [cfg for c in args.server_concurrency
                                   for cfg in run_config(c or None, args, workdir, images)]}
            failed = [(cfg["app"], cfg["server_concurrency"], lv["users"]) for cfg in results["configs"]
                      for lv in cfg["levels"] if lv["errors"] or lv["lost"]]
            print(f"errors/lost: {'none' if not failed else failed}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
