"""Which out-of-distribution score works? The comparison behind ``docs/out_of_distribution.md``.

For every member of a lineup (nothing lineup-specific: one record at a time) this fits the four scores
of :mod:`cbam_viz.engine.ood` on the training split, sets each threshold to accept 95 % of the validation
images, and scores an out-of-class set: the photos and pictures that installed packages ship
(Gradio's media assets and test data, matplotlib's and scikit-learn's samples, scikit-image's
data when it is installed) and pictures drawn here from a seed (noise, gradients, stripes,
checkerboards, shapes, blobs). Reported per model and score: AUROC (validation images vs the
out-of-class set; 1 = perfectly separated) and the share of out-of-class images flagged at the
threshold. Run::

    python -m cbam_viz.research.ood_eval --data ../shared/data/imagenette2 --out docs/out_of_distribution.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from cbam_viz.engine import ood
from cbam_viz.engine.lineup import load_lineup
from cbam_viz.research.ood_fit import extract, split_features

__all__ = ["packaged_images", "generated_images", "compare", "main"]

# (package, folder inside it, file names): only files that exist are used; exact duplicates
# (Gradio ships cheetah1 twice, its bus as test_image.png, its logo as avatar.png) once.
_PACKAGED = (
    ("gradio", "media_assets/images", ("cheetah.jpg", "cheetah1.jpg", "groot.jpeg", "lion.jpg", "tower.jpg",
                                       "bus.png", "logo.png", "hf-logo_transpng.png", "screenshot.gif")),
    ("gradio", "test_data", ("cheetah2.jpg", "rectangles.gif")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
    ("skimage", "data", ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
                         "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png", "color.png",
                         "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
                         "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png",
                         "retina.jpg", "rocket.jpg", "text.png")),
)
_KINDS = ("noise", "blur_noise", "gradient", "stripes", "checker", "shapes", "blobs", "solid")


def packaged_images() -> dict[str, Path]:
    """``{"package/file": path}`` of the out-of-class pictures installed packages ship (none of the ten classes)."""
    out = {}
    for package, folder, names in _PACKAGED:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0]) / folder
        for name in names:
            if (root / name).is_file():
                out[f"{package}/{name}"] = root / name
    return out


def generated_images(per_kind: int = 5, size: int = 224, seed: int = 0) -> dict[str, Image.Image]:
    """Seeded pictures of nothing the models know: ``per_kind`` of each of eight kinds."""
    rng = np.random.default_rng(seed)
    out = {}
    yy, xx = np.mgrid[0:size, 0:size] / size
    for kind in _KINDS:
        for i in range(per_kind):
            c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            if kind == "noise":
                a = rng.integers(0, 256, (size, size, 3))
            elif kind == "blur_noise":
                a = np.asarray(Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3)).astype(np.uint8))
                               .resize((size, size), Image.BICUBIC))
            elif kind == "gradient":
                t = np.clip(np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy, 0, 1)[..., None]
                a = c1 * (1 - t) + c2 * t
            elif kind in ("stripes", "checker"):
                f = rng.integers(3, 20)
                wave = np.sin(2 * np.pi * f * (xx if i % 2 else yy)) > 0
                if kind == "checker":
                    wave = wave ^ (np.sin(2 * np.pi * f * (yy if i % 2 else xx)) > 0)
                a = np.where(wave[..., None], c1, c2)
            elif kind == "solid":
                a = np.broadcast_to(c1, (size, size, 3))
            else:
                im = Image.new("RGB", (size, size), tuple(int(v) for v in c1))
                d = ImageDraw.Draw(im)
                for _ in range(rng.integers(3, 9)):
                    x0, y0 = rng.integers(0, size, 2)
                    x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
                    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                    (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
                if kind == "blobs":
                    im = im.filter(ImageFilter.GaussianBlur(8))
                a = np.asarray(im)
            out[f"generated/{kind}_{i}"] = Image.fromarray(np.asarray(a, dtype=np.uint8))
    return out


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an out-of-class image > score of an in-class one), ties counted half."""
    from sklearn.metrics import roc_auc_score  # not a dependency of the package: only this script needs it

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def compare(loaded, data: Path, *, cache_dir: Path | None = None, per_class: tuple = (None, None),
            progress: bool = False) -> dict:
    """Every score of one model: AUROC, flagged shares and per-image scores (JSON-ready).

    ``per_class``: (train, val) caps per class, as :func:`cbam_viz.research.ood_fit.fit_record` takes them.
    """
    kw = {"cache_dir": cache_dir, "progress": progress}
    train = split_features(loaded, data / "train", per_class=per_class[0], **kw)
    val = split_features(loaded, data / "val", per_class=per_class[1], **kw)
    sets = {"packaged": packaged_images(), "generated": generated_images()}
    outside = {}
    for group, images in sets.items():
        pics = list(images.values())  # paths decode as the app decodes them (transparency on white)
        feats, logits = extract(loaded.model, pics, input_size=loaded.input_size, mean=loaded.mean, std=loaded.std)
        outside[group] = (list(images), feats, logits)
    result = {"model": loaded.name, "n_train": len(train["labels"]), "n_val": len(val["labels"]),
              "n_out": {g: len(v[0]) for g, v in outside.items()}, "scores": {}}
    for method in ood.METHODS:
        stats = ood.calibrate(ood.fit_stats(method, train["features"], train["labels"], len(loaded.classes)),
                              val["features"], val["logits"])
        inside = stats.score(val["features"], val["logits"]).numpy()
        row = {"threshold": stats.threshold, "val_flagged": float((inside > stats.threshold).mean())}
        all_out = []
        for group, (names, feats, logits) in outside.items():
            s = stats.score(feats, logits).numpy()
            all_out.append(s)
            row[group] = {"auroc": _auroc(inside, s), "flagged": float((s > stats.threshold).mean()),
                          "per_image": {n: round(float(v), 4) for n, v in zip(names, s)}}
        s = np.concatenate(all_out)
        row["all"] = {"auroc": _auroc(inside, s), "flagged": float((s > stats.threshold).mean())}
        result["scores"][method] = row
    top1 = {g: torch.softmax(v[2], 1).amax(1) for g, v in outside.items()}
    result["median_top1"] = {"val": float(torch.softmax(val["logits"], 1).amax(1).median()),
                             **{g: float(t.median()) for g, t in top1.items()}}
    return result


def markdown(results: list[dict]) -> str:
    """The comparison as a Markdown table (one row per model and score)."""
    lines = ["| model | score | AUROC packaged | AUROC generated | AUROC all | flagged packaged | "
             "flagged generated | flagged all | val flagged |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for method, row in r["scores"].items():
            lines.append(f"| {r['model']} | {method} | {row['packaged']['auroc']:.3f} | {row['generated']['auroc']:.3f} "
                         f"| {row['all']['auroc']:.3f} | {row['packaged']['flagged']:.0%} | "
                         f"{row['generated']['flagged']:.0%} | {row['all']['flagged']:.0%} | {row['val_flagged']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbam_viz.research.ood_eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--lineup", default=None, help="the lineup whose members are compared (default: the default one)")
    p.add_argument("--pair", dest="lineup", help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--cache", type=Path, default=None, help="keep the extracted features here for re-runs")
    p.add_argument("--out", type=Path, default=None, help="write the full results (JSON) here")
    p.add_argument("--train-per-class", type=int, help="fit on at most N images per class (default: all)")
    p.add_argument("--val-per-class", type=int, help="calibrate on at most N images per class (default: all)")
    p.add_argument("--model", action="append", help="only this member, by name (repeatable)")
    args = p.parse_args(argv)
    lineup = load_lineup(args.lineup, weights_dir=args.weights, device="cpu")
    caps = (args.train_per_class, args.val_per_class)
    results = [compare(lineup.member(name), args.data, cache_dir=args.cache, per_class=caps, progress=True)
               for name in (args.model or lineup.names)]
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
