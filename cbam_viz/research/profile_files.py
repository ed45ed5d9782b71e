"""The files of ``python -m cbam_viz channel-profiles``: one member's, a lineup's, and reading them back.

One member (:func:`write_profiles`): ``profiles.npz`` (per block the ``(K, C)`` class means, plus
counts), ``channel_profiles.json`` (the numbers per block), ``channel_profiles.md`` and
``channel_profiles.png`` (one panel per block, :func:`cbam_viz.research.channel_profiles.profiles_figure`),
all atomic, ``.json`` last. A lineup (:func:`write_lineup_profiles`): each member's files in a
sub-folder named after it, and beside them one ``channel_profiles.md`` / ``.json`` with every
member's numbers side by side. :func:`load_lineup_profiles` reads either layout (the shipped
``docs/channel_profiles`` of one model included).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cbam_viz.engine.lineup import Lineup
from cbam_viz.outputs import atomic_write, atomic_write_text, json_float, prepare_output_dir, write_json, write_npz
from cbam_viz.research.channel_profiles import ChannelProfiles, chance_variance_ratio, profiles_figure, similarity_rows

__all__ = ["report_json", "markdown_report", "write_profiles", "write_lineup_profiles", "load_profiles",
           "load_lineup_profiles"]


def report_json(profiles: ChannelProfiles) -> dict[str, Any]:
    """The JSON document of ``channel_profiles.json``."""
    return {"model": profiles.model_name, "data": profiles.data, "n": int(profiles.counts.sum()),
            "counts": {c: int(n) for c, n in zip(profiles.class_ids, profiles.counts)},
            "classes": [{"id": i, "name": n} for i, n in zip(profiles.class_ids, profiles.class_names)],
            "blocks": {r["block"]: {k: v for k, v in r.items() if k != "block"} for r in similarity_rows(profiles)},
            "chance_variance_ratio": json_float(chance_variance_ratio(profiles), 4),
            **profiles.extra}


def markdown_report(profiles: ChannelProfiles) -> str:
    """The ``channel-profiles`` table: per block, the two class-similarity numbers."""
    lines = [f"## Channel attention per class: {profiles.model_name}", "",
             f"{int(profiles.counts.sum())} images of {int((profiles.counts > 0).sum())} classes from "
             f"`{profiles.data}`. *r*: mean over class pairs of the Pearson correlation between their mean "
             "channel-gate profiles (1 = every class gated alike). *η²*: share of the per-image gate "
             "variance explained by the class (0 = class-agnostic, 1 = determined by the class; a class-agnostic "
             f"gate scores {chance_variance_ratio(profiles):.3f} by chance with these counts). "
             "SE-Net's finding, to compare with: early blocks class-agnostic, late blocks class-specific.", ""]
    if profiles.extra.get("trained") is False:
        lines += ["> **Untrained model**: these numbers describe a random network.", ""]
    lines += ["| block | channels | r | η² |", "|---|---:|---:|---:|"]
    for r in similarity_rows(profiles):
        cells = ["n/a" if r[k] is None else f"{r[k]:.3f}" for k in ("profile_correlation", "class_variance_ratio")]
        lines.append(f"| {r['block']} | {r['channels']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines + [""])


def write_profiles(profiles: ChannelProfiles, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``profiles.npz``, ``channel_profiles.png``, ``.md`` and ``.json`` (last) to ``out``, atomically.

    ``profiles.npz`` holds, per block, the ``(K, C)`` means under the block's name, their mean
    squares under ``mean_square/<block>``, and ``counts``, ``class_ids``, ``class_names``, ``model_name``, ``data``.
    """
    out = prepare_output_dir(out)
    paths = {"npz": out / "profiles.npz", "figure": out / "channel_profiles.png",
             "markdown": out / "channel_profiles.md", "json": out / "channel_profiles.json"}
    arrays = {"counts": profiles.counts, "class_ids": np.array(profiles.class_ids),
              "class_names": np.array(profiles.class_names), "model_name": np.array(profiles.model_name),
              "data": np.array(profiles.data), **profiles.means,
              **{f"mean_square/{b}": v for b, v in profiles.mean_squares.items()}}
    write_npz(arrays, paths["npz"])
    figure = profiles_figure(profiles)
    atomic_write(paths["figure"], lambda f: figure.savefig(f, format="png", dpi=110))
    atomic_write_text(paths["markdown"], markdown_report(profiles))
    write_json(report_json(profiles), paths["json"])
    return paths


def _member_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_lineup_profiles(profiles: Mapping[str, ChannelProfiles], out: str | os.PathLike, *,
                          lineup: Lineup | None = None) -> dict[str, Path]:
    """Write every member's files (:func:`write_profiles`) into ``out/<member>/``, then one
    ``channel_profiles.md`` and ``channel_profiles.json`` (last) for the lineup beside them; a
    single model's ``profiles.npz`` and figure left in ``out`` by an older run are removed."""
    out = prepare_output_dir(out)
    paths = {}
    for name, prof in profiles.items():
        paths[f"npz {name}"] = write_profiles(prof, out / _member_folder(name))["npz"]
    skipped = [n for n in (lineup.names if lineup else []) if n not in profiles]
    doc = {"lineup": lineup.name if lineup else "", "members": list(profiles), "skipped": skipped,
           "folders": {n: _member_folder(n) for n in profiles},
           "models": {n: report_json(p) for n, p in profiles.items()}}
    md = [f"## Channel attention per class: {', '.join(profiles)}", ""]
    if skipped:
        md += [f"No channel gate: {', '.join(skipped)}.", ""]
    md += ["| block | " + " | ".join(f"{n}: r | {n}: η²" for n in profiles) + " |",
           "|---|" + "---:|---:|" * len(profiles)]
    rows = {n: {r["block"]: r for r in similarity_rows(p)} for n, p in profiles.items()}
    for block in dict.fromkeys(b for r in rows.values() for b in r):
        cells = [("n/a" if rows[n].get(block, {}).get(k) is None else f"{rows[n][block][k]:.3f}")
                 for n in profiles for k in ("profile_correlation", "class_variance_ratio")]
        md.append(f"| {block} | " + " | ".join(cells) + " |")
    md += [""] + [markdown_report(p) for p in profiles.values()]
    paths["markdown"] = atomic_write_text(out / "channel_profiles.md", "\n".join(md))
    for stale in ("profiles.npz", "channel_profiles.png"):  # one model's files, from a run before lineups,
        (out / stale).unlink(missing_ok=True)                 # would shadow the lineup's index when read
    paths["json"] = write_json(doc, out / "channel_profiles.json")
    return paths


def load_lineup_profiles(path: str | os.PathLike) -> dict[str, ChannelProfiles]:
    """``{member: profiles}`` of a folder of :func:`write_lineup_profiles`, or of one model's folder
    or ``profiles.npz`` (:func:`write_profiles`, as ``channel-profiles`` wrote before lineups), in
    the lineup's order.

    Raises:
        FileNotFoundError: neither layout is there.
    """
    path = Path(path)
    if (path.is_file() and path.suffix == ".npz") or (path / "profiles.npz").is_file():
        one = load_profiles(path)
        return {one.model_name or (path.stem if path.is_file() else path.name): one}
    index = path / "channel_profiles.json"
    if not index.is_file():
        raise FileNotFoundError(f"no channel profiles in {path} (run: python -m cbam_viz channel-profiles ...)")
    folders = json.loads(index.read_text()).get("folders") or {}
    return {name: load_profiles(path / folder) for name, folder in folders.items()}


def load_profiles(path: str | os.PathLike) -> ChannelProfiles:
    """Read the ``profiles.npz`` of :func:`write_profiles` (a file or its folder) back; a lineup's
    folder (:func:`write_lineup_profiles`) gives its last member's."""
    path = Path(path)
    if path.is_dir() and not (path / "profiles.npz").is_file() and (path / "channel_profiles.json").is_file():
        return list(load_lineup_profiles(path).values())[-1]
    if path.is_dir():
        path = path / "profiles.npz"
    with np.load(path) as data:
        fixed = {"counts", "class_ids", "class_names", "model_name", "data"}
        means = {k: data[k] for k in data.files if k not in fixed and not k.startswith("mean_square/")}
        return ChannelProfiles(
            class_ids=tuple(str(c) for c in data["class_ids"]), class_names=tuple(str(c) for c in data["class_names"]),
            counts=data["counts"], means=means,
            mean_squares={b: data[f"mean_square/{b}"] for b in means},
            model_name=str(data["model_name"]) if "model_name" in data.files else "",
            data=str(data["data"]) if "data" in data.files else str(path))
