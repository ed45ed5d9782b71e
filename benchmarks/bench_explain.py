"""Benchmark 1, the engine: what one explanation costs next to the model's own forward + backward.

Variants, all on the shipped default lineup (:func:`cbam_viz.engine.lineup.load_lineup`; before any weights
exist it is the seeded untrained resnet18 / resnet18_cbam lineup, which times the same) at its input size:

* ``floor``: for each member, one forward and one backward of the bare model (no hooks, no CAM,
  no preprocessing): ``logits[range, argmax].sum().backward()``. The least any gradient-CAM tool
  can do.
* ``engine``: :func:`cbam_viz.engine.explain.explain` (preprocessing, predictions, Grad-CAM and every
  attention map of every member, numpy arrays only).
* ``full``: ``engine`` plus everything else the app shows for each image, with the same calls as
  :func:`cbam_viz.service.analyse`: the per-image faithfulness (one more forward per member, on
  the input with its CAM's top 20 % blurred) and every picture (one CAM overlay per member, one
  spatial attention sheet and one channel overview per gated member, the composite, the
  faithfulness panel), in memory.
* ``app``: :func:`cbam_viz.service.explain_files` as the ``/explain`` endpoint calls it, i.e. what
  one API request costs inside the server: one ``analyse`` per image (not batched) drawing what
  ``/explain`` returns (``service.API_PICTURES``: the overlays, the spatial sheets, the channel
  overviews) and writing it with the JSON and the npz (``service.API_FILES``).
* ``page``: the same as the Explain button calls it (``service.PAGE_PICTURES`` / ``PAGE_FILES``:
  the photo, the overlays, one sheet of every block's spatial attention per gated member, the
  faithfulness panel, the JSON and the npz; the composite is built when a person asks for the downloads).
* ``naive``: what a typical demo does: ``pytorch_grad_cam.GradCAM(model, target_layers)`` per
  member, a separate forward for the predictions, a separate forward with hooks for the attention
  maps, then one matplotlib figure per picture (``plt.subplots``, ``imshow``/``bar``,
  ``savefig`` to a ``BytesIO``), at the same pixel sizes as ours.

Timing: every repeat runs each variant once, round-robin (the start rotates each repeat) so
that a noisy neighbour slows all variants alike; the median over repeats is reported.

Memory (``--memory``, on by default): each variant runs in a fresh subprocess that first imports
everything and loads the lineup, then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``
= 5) and runs the variant ``--memory-repeats`` times. ``peak RSS delta`` is ``VmHWM`` minus the
RSS before the first call: every byte the variant made resident (torch's CPU allocator, numpy,
matplotlib, Python objects) at its worst moment. ``py peak`` is tracemalloc's peak over one more
call: Python objects and numpy arrays only (torch tensors are invisible to tracemalloc).

Usage::

    python benchmarks/bench_explain.py                       # batch 1 and 8, 15 repeats, memory
    python benchmarks/bench_explain.py --repeats 3 --batch 1 --no-memory   # a quick look
    python benchmarks/bench_explain.py --profile engine --batch 1          # where the time goes
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

VARIANTS = ("floor", "engine", "full", "app", "page", "naive")
# (name, numerator, denominator, bound, "le"/"ge"): the targets of issues 5 and 14.
TARGETS = (
    ("engine/floor", "engine", "floor", 1.10, "le"),
    ("full/floor", "full", "floor", 2.00, "le"),
    ("naive/full", "naive", "full", 1.60, "ge"),
    ("app/full", "app", "full", 1.50, "le"),
    ("page/full", "page", "full", 1.50, "le"),
)
IMAGE_SIZE = (500, 375)  # a typical Imagenette photo


# ------------------------------------------------------------------------------------- inputs


def make_image(size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> Image.Image:
    """A seeded photo-like picture: CAMs and attention over it vary (see ``synthetic_photo``)."""
    from cbam_viz.app.examples import synthetic_photo

    return synthetic_photo(size, seed)


def load_bench_lineup(tiny: bool = False):
    """The shipped default lineup (or its untrained stand-in); ``tiny``: the untrained lineup at 64 px (tests).

    On ``$CBAM_VIZ_DEVICE`` when set (``cuda`` in benchmarks/gpu_check.sh), else the CPU.
    """
    from cbam_viz.engine.lineup import UNTRAINED_LINEUP, load_lineup

    device = os.environ.get("CBAM_VIZ_DEVICE") or "cpu"
    if tiny:
        lineup = load_lineup(UNTRAINED_LINEUP, device=device)
        return replace(lineup, members=tuple(replace(m, input_size=64) for m in lineup.members))
    return load_lineup(device=device)


# ------------------------------------------------------------------------------------ variants


def render_like_service(image: Image.Image, explanation, *, alpha: float = 0.5) -> list[Image.Image]:
    """Every picture :func:`cbam_viz.service.analyse` draws for one image (same calls, same order)."""
    from cbam_viz import figures, render

    models = explanation.models.values()
    out = [render.overlay(image, m.cam, alpha=alpha) for m in models]
    out += [render.attention_sheet(image, m, alpha=alpha) for m in models if m.spatial_attention]
    out += [render.channel_attention_summary(m) for m in models if m.channel_attention]
    out.append(figures.composite(image, explanation, alpha=alpha))
    return out


class Variants:
    """The benchmarked callables over one lineup and one batch of images."""

    def __init__(self, lineup, images: list[Image.Image], workdir: Path):
        from cbam_viz.engine.preprocess import to_model_batch

        self.lineup = lineup
        self.images = images
        self.models = [m.model for m in lineup.members]
        m = lineup.members[-1]
        self.batch = to_model_batch(images, m.input_size, m.mean, m.std)
        self.workdir = workdir
        self.paths = []
        for i, im in enumerate(images):
            path = workdir / f"input_{i}.jpg"  # what people upload; what bench_server.py sends
            im.save(path, quality=90)
            self.paths.append(str(path))
        self.last_timings: dict[str, list[dict[str, float]]] = {}

    def get(self, name: str) -> Callable[[], object]:
        return getattr(self, name)

    # -- floor
    def floor(self):
        x = self.batch
        for model in self.models:
            logits = model(x)
            loss = logits[torch.arange(x.shape[0]), logits.argmax(1)].sum()
            loss.backward()
        return None

    def after_floor(self):
        for model in self.models:
            model.zero_grad(set_to_none=True)

    # -- ours
    def engine(self):
        from cbam_viz.engine.explain import explain

        out = explain(self.images, self.lineup)
        self.last_timings.setdefault("engine", []).append(_engine_timings(out))
        return out

    def full(self):
        from cbam_viz.engine.explain import explain

        from cbam_viz.engine.faithfulness import lineup_confidence_drop
        from cbam_viz.figures import confidence_drop_figure
        from cbam_viz.service import FAITHFULNESS_FRACTION

        explanations = explain(self.images, self.lineup)
        out = []
        for im, e in zip(self.images, explanations):
            drops = lineup_confidence_drop(im, e, self.lineup, fraction=FAITHFULNESS_FRACTION)
            out.append([*render_like_service(im, e), confidence_drop_figure(drops, self.lineup)])
        return out

    def app(self):
        from cbam_viz import service

        kinds = {"pictures": service.API_PICTURES, "write": service.API_FILES} if hasattr(service, "API_FILES") else {}
        return service.explain_files(self.paths, lineup_name=None, out_root=self.workdir / "out",
                                     max_images=len(self.paths), **kinds)

    def after_app(self):
        import shutil

        shutil.rmtree(self.workdir / "out", ignore_errors=True)

    def page(self):
        from cbam_viz import service

        return service.explain_files(self.paths, lineup_name=None, out_root=self.workdir / "out",
                                     max_images=len(self.paths), pictures=service.PAGE_PICTURES,
                                     write=service.PAGE_FILES)

    after_page = after_app

    # -- the typical demo
    def naive(self):
        return naive_demo(self.lineup, self.images)


def _engine_timings(explanations) -> dict[str, float]:
    e = explanations[0]
    out: dict[str, float] = {}
    for name, m in e.models.items():
        for k, v in m.timings.items():
            out[f"{name}.{k}"] = float(v)
    return out


def naive_demo(lineup, images: list[Image.Image]) -> list[bytes]:
    """A typical Grad-CAM demo: the library's GradCAM object, extra forwards, matplotlib figures.

    Same preprocessing as ours (so only the approach differs), the library's own
    ``show_cam_on_image`` for the overlays, and figure sizes that give the same pixel sizes as
    :mod:`cbam_viz.render` (256 px overlays and tiles, 512x64 channel strips, an 800 px composite).
    """
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from cbam_viz.engine.preprocess import to_model_batch

    m0 = lineup.members[-1]
    x = to_model_batch(images, m0.input_size, m0.mean, m0.std)
    per_model = {}
    for loaded in lineup.members:
        model = loaded.model
        with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            grayscale = cam(input_tensor=x, targets=None)           # (B, S, S), predicted class
        with torch.no_grad():                                         # predictions: another forward
            probs = torch.softmax(model(x), dim=1)
            top_p, top_i = probs.topk(5, dim=1)
        maps: dict[str, torch.Tensor] = {}                            # attention: a forward with hooks
        hooks = [module.register_forward_hook(lambda mod, inp, out, n=name: maps.__setitem__(n, out.detach()))
                 for name, module in model.named_modules() if name.endswith((".cbam.channel", ".cbam.spatial"))]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        model.zero_grad(set_to_none=True)
        labels = [[loaded.classes[int(c)] for c in row] for row in top_i.tolist()]
        per_model[loaded.name] = (grayscale, top_p.tolist(), labels, maps)

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    out: list[bytes] = []
    for i, im in enumerate(images):
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        overlays = {}
        for name, (gray, probs, labels, maps) in per_model.items():
            mask = cv2.resize(gray[i], im.size)
            overlays[name] = show_cam_on_image(rgb, mask, use_rgb=True)
            fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=80)
            ax.imshow(overlays[name])
            ax.set_title(f"{name}: {labels[i][0]} ({probs[i][0]:.1%})", fontsize=8)
            ax.axis("off")
            out.append(png(fig))
        maps = per_model[lineup.members[-1].name][3]  # the last member's gates, as the app's CBAM member
        spatial = {n[: -len(".cbam.spatial")]: t[i, 0].numpy() for n, t in maps.items() if n.endswith("spatial")}
        channel = {n[: -len(".cbam.channel")]: t[i].flatten().numpy() for n, t in maps.items() if n.endswith("channel")}
        for block, s in spatial.items():
            fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=80)
            ax.imshow(rgb)
            ax.imshow(cv2.resize(s, im.size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"{block} spatial {s.shape[0]}x{s.shape[1]}", fontsize=8)
            ax.axis("off")
            out.append(png(fig))
        for block, v in channel.items():
            fig, ax = plt.subplots(figsize=(6.4, 0.8), dpi=80)
            ax.bar(np.arange(v.size), v, width=1.0, color=plt.cm.viridis(v))
            ax.set_ylim(0, 1)
            ax.set_title(f"{block} channel C={v.size}", fontsize=8)
            out.append(png(fig))
        # Faithfulness the usual way: blur the CAM's top 20 % in the photo, preprocess again,
        # classify original and perturbed in a forward of their own, one figure for every member.
        fig, axes = plt.subplots(1, len(per_model), figsize=(3.2 * len(per_model), 3.6), dpi=80, squeeze=False)
        for ax, (name, (gray, probs, labels, maps)) in zip(axes[0], per_model.items()):
            loaded = lineup.member(name)
            mask = cv2.resize(gray[i], im.size) >= np.percentile(gray[i], 80)
            blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=max(1.0, min(im.size) / 16))
            perturbed = np.where(mask[..., None], blurred, rgb)
            pair_in = to_model_batch([im, Image.fromarray(np.uint8(perturbed * 255))], loaded.input_size,
                                     loaded.mean, loaded.std)
            with torch.no_grad():
                p = torch.softmax(loaded.model(pair_in), dim=1)
            c = int(p[0].argmax())
            ax.imshow(perturbed)
            ax.set_title(f"{name}: p {float(p[0, c]):.2f} -> {float(p[1, c]):.2f}", fontsize=8)
            ax.axis("off")
        out.append(png(fig))
        fig, axes = plt.subplots(3, max(4, 1 + len(overlays)), figsize=(10, 8), dpi=80)  # the composite
        for ax in axes.flat:
            ax.axis("off")
        for ax, (title, picture) in zip(axes[0], (("original", rgb), *overlays.items())):
            ax.imshow(picture)
            ax.set_title(title, fontsize=8)
        for ax, (block, s) in zip(axes[1:].flat, spatial.items()):
            ax.imshow(rgb)
            ax.imshow(cv2.resize(s, im.size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(block, fontsize=8)
        out.append(png(fig))
    return out


# ------------------------------------------------------------------------------------- timing


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_timed(v: Variants, names: list[str], *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved repeats: each round runs every variant once, the starting variant rotating."""
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = v.get(name)
            gc.collect()
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            dt = time.perf_counter() - t
            after = getattr(v, f"after_{name}", None)
            if after is not None:
                after()
            if r >= warmup:
                times[name].append(dt)
    if warmup:
        v.last_timings["engine"] = v.last_timings.get("engine", [])[warmup:]
    return times


# ------------------------------------------------------------------------------------- memory


def _proc_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def memory_child(variant: str, batch: int, repeats: int, tiny: bool) -> dict:
    """In a fresh process: peak RSS growth and tracemalloc peak of ``variant`` (see module doc)."""
    import tracemalloc

    import matplotlib  # imported up front: imports are not the variant's memory
    matplotlib.use("Agg")
    import cv2  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import pytorch_grad_cam  # noqa: F401

    from cbam_viz import render, service  # noqa: F401
    from cbam_viz.engine.explain import explain  # noqa: F401

    lineup = load_bench_lineup(tiny)
    images = [make_image(seed=i) for i in range(batch)]
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        v = Variants(lineup, images, Path(tmp))
        fn = v.get(variant)
        after = getattr(v, f"after_{variant}", None) or (lambda: None)
        gc.collect()
        base = _proc_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            reset = True
        except OSError:
            reset = False
        for _ in range(repeats):
            fn()
            after()
        peak = _proc_kib("VmHWM")
        gc.collect()
        tracemalloc.start()
        fn()
        after()
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"variant": variant, "batch": batch, "base_rss_mib": base / 1024, "peak_rss_mib": peak / 1024,
            "peak_rss_delta_mib": (peak - base) / 1024, "py_peak_mib": py_peak / 2**20, "hwm_reset": reset}


def measure_memory(variant: str, batch: int, repeats: int, tiny: bool) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", variant, "--batch", str(batch),
           "--memory-repeats", str(repeats)] + (["--tiny"] if tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- report


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.3f} s"


def report(batch: int, times: dict[str, list[float]], v: Variants) -> dict:
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n== batch {batch} ({len(next(iter(times.values())))} interleaved repeats, median; "
          f"input {v.lineup.members[-1].input_size}px, images {v.images[0].size[0]}x{v.images[0].size[1]}) ==")
    for n, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        print(f"  {n:<7} median {_fmt_s(med[n]):>10}   per image {_fmt_s(med[n] / batch):>10}   "
              f"IQR {_fmt_s(q[0])} .. {_fmt_s(q[2])}")
    results = {"batch": batch, "median_s": med, "all_s": times, "ratios": {}}
    for label, num, den, bound, kind in TARGETS:
        if num in med and den in med:
            ratio = med[num] / med[den]
            ok = ratio <= bound if kind == "le" else ratio >= bound
            sign = "<=" if kind == "le" else ">="
            print(f"ratio b={batch} {label} = {ratio:.2f} (target {sign} {bound:.2f}) {'MET' if ok else 'MISSED'}")
            results["ratios"][label] = {"value": ratio, "bound": bound, "kind": kind, "met": ok}
    if "app" in med and "naive" in med:
        print(f"ratio b={batch} naive/app = {med['naive'] / med['app']:.2f} (info: app = full + per-image "
              "explain + PNG/JSON/npz files)")
        results["ratios"]["naive/app"] = {"value": med["naive"] / med["app"]}
    steps = v.last_timings.get("engine")
    if steps:
        keys = steps[0].keys()
        parts = {k: statistics.median(s[k] for s in steps) for k in keys}
        print("  engine steps (median, seconds): " + ", ".join(
            f"{k} {val * 1000:.1f} ms" for k, val in parts.items() if not k.endswith("total")))
        results["engine_steps_s"] = parts
    return results


def profile(v: Variants, name: str, repeats: int) -> None:
    import cProfile
    import pstats

    fn = v.get(name)
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats per batch size (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory runs")
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="untrained lineup at 64 px: a smoke run, not a measurement")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", choices=VARIANTS, help="cProfile this variant instead of benchmarking")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, i.e. the cores)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=list(IMAGE_SIZE),
                   help=f"the photo's size (default {IMAGE_SIZE[0]} {IMAGE_SIZE[1]}; issue 14's figure: 224 224)")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch[0], args.memory_repeats, args.tiny)))
        return 0

    import platform

    lineup = load_bench_lineup(args.tiny)
    last = lineup.members[-1]
    print(f"lineup {lineup.name!r}: {', '.join(lineup.names)} (trained={lineup.trained}), "
          f"input {last.input_size}px, device {last.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    all_results = {"lineup": lineup.name, "members": lineup.names, "trained": lineup.trained,
                   "input_size": last.input_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "batches": []}
    for b in args.batch:
        images = [make_image(tuple(args.image_size), seed=i) for i in range(b)]
        with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
            v = Variants(lineup, images, Path(tmp))
            if args.profile:
                profile(v, args.profile, max(1, args.repeats))
                continue
            times = run_timed(v, list(args.variants), repeats=args.repeats, warmup=args.warmup)
            res = report(b, times, v)
        if args.memory:
            res["memory"] = {}
            for name in args.variants:
                mem = measure_memory(name, b, args.memory_repeats, args.tiny)
                res["memory"][name] = mem
                print(f"memory b={b} {name:<7} peak RSS delta {mem['peak_rss_delta_mib']:7.1f} MiB "
                      f"(peak RSS {mem['peak_rss_mib']:.0f} MiB over a {mem['base_rss_mib']:.0f} MiB process"
                      f"{'' if mem['hwm_reset'] else ', HWM not reset: upper bound'}), "
                      f"py peak {mem['py_peak_mib']:.1f} MiB")
        all_results["batches"].append(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(all_results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
