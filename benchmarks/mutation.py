"""Mutation testing of the science layers: would the tests notice a wrong number or picture?

Coverage says a line ran; a mutant says whether a test *checked* it. This harness changes one
operator or constant at a time inside the chosen functions of a module (``<`` -> ``<=``, ``+`` ->
``-``, ``0`` -> ``1``, ``True`` -> ``False``, ``and`` -> ``or``, a dropped ``not`` or minus sign,
...), runs only the test files that cover that module, and counts the mutant as *killed* when
they fail (or time out). A surviving mutant is a change of behaviour no test asserts against,
unless it is equivalent (the same behaviour written differently): docs/mutation.md lists the
survivors with the reason for each.

Why a harness of our own and not ``mutmut``: mutmut 3 copies the package into ``mutants/`` and
rewrites every function into a trampoline; the tests here import by module path, run CLI
commands in-process and compare against pytorch-grad-cam, all of which it has to follow. Here
the mutant is compiled from the mutated syntax tree (line numbers kept) and imported in place
of the module by a meta-path finder, in a process forked from one that already imported torch,
so a mutant costs the tests' own time plus a fork, and nothing in the tree is ever rewritten
(other people's test runs see the real files).

Usage (from the repository root; CPU-heavy: run it under ``nice``)::

    nice -n 10 .venv/bin/python benchmarks/mutation.py --list            # count the mutants
    nice -n 10 .venv/bin/python benchmarks/mutation.py --out /tmp/mut.jsonl     # all targets
    nice -n 10 .venv/bin/python benchmarks/mutation.py --module sanity --out /tmp/mut.jsonl
    nice -n 10 .venv/bin/python benchmarks/mutation.py --bugs            # the issue's 12 planted bugs
    .venv/bin/python benchmarks/mutation.py --summary /tmp/mut.jsonl    # per-module table + survivors

``--out`` is appended to and read back: an interrupted run resumes where it stopped. Not run in
CI (about an hour on two cores); ``tests/test_mutation_harness.py`` checks the harness itself.
"""
from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (functions to mutate (None: the whole module), test files that cover it).
# The functions are where the numbers and pictures come from; report writers (Markdown wording,
# file names) are covered by the modules' own CLI tests and left out to keep the run affordable.
TARGETS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "cbam_viz.engine.faithfulness": (None, ("tests/test_faithfulness.py", "tests/test_science_faithfulness.py")),
    "cbam_viz.engine.cam_library": (None, ("tests/test_science_cams.py", "tests/test_cam.py")),
    "cbam_viz.research.gate_ablation": (
        ("ablatable_gates", "gated_blocks", "_kinds_of", "_applies", "ablation_grid", "_check_ablation",
         "_constant_hook", "ablate_gates", "gate_means", "gate_sums", "means_from_sums", "save_gate_means", "load_gate_means", "ablation_effects",
         "ablate_image"),
        ("tests/test_science_ablation.py", "tests/test_gate_ablation.py")),
    "cbam_viz.research.ablation_report": (
        ("_count", "ablate_dataset", "ablate_lineup"), ("tests/test_science_ablation.py", "tests/test_gate_ablation.py")),
    "cbam_viz.research.sanity": (
        ("stage_modules", "_seeded", "cascading_randomization", "_gaussian_1d", "ssim", "_average_ranks",
         "rank_correlation", "n_images", "rows", "concat", "sanity_check", "sanity_image", "sanity_flags",
         "_summary", "sanity_dataset"),
        # test_sanity.py's 128 px three-method cascade and CLI run would cost minutes per mutant.
        # The cheap tests first: a mutant stops at its first failing test.
        ("tests/test_sanity.py::test_metrics_against_known_values",
         "tests/test_sanity.py::test_stem_is_conv1_and_bn1", "tests/test_sanity.py::test_flags_on_constructed_results",
         "tests/test_science_sanity.py",
         "tests/test_sanity.py::test_the_cascade_is_cumulative_seeded_and_leaves_the_original_untouched",
         "tests/test_sanity.py::test_one_call_for_the_app_keeps_the_cams")),
    "cbam_viz.research.channel_profiles": (
        ("blocks", "accumulate_profiles", "has_channel_gates", "profile_lineup", "profile_dataset",
         "_profile_correlation", "_class_variance_ratio", "block_similarity", "chance_variance_ratio",
         "similarity_rows", "profiles_figure", "profiles_image"),
        ("tests/test_science_profiles.py", "tests/test_channel_profiles.py")),
    "cbam_viz.research.profile_files": (
        ("report_json", "load_profiles", "load_lineup_profiles"),
        ("tests/test_science_profiles.py", "tests/test_channel_profiles.py")),
    "cbam_viz.research.quality.forest": (
        ("verdict", "comparisons", "_point", "reading"), ("tests/test_evaluate_cams.py",)),
    "cbam_viz.training.evaluate": (
        ("_labels_in_class_order", "spread_indices", "labelled_images", "image_batches", "evaluate_record"),
        ("tests/test_science_evaluate.py", "tests/test_evaluate.py")),
    "cbam_viz.training.compare": (
        ("paired_difference", "lineup_differences"), ("tests/test_science_evaluate.py", "tests/test_evaluate.py")),
    "cbam_viz.training.data": (("normalize", "resize_batch"), ("tests/test_science_pictures.py", "tests/test_data.py")),
    "cbam_viz.colour_scale": (("colormap_lut",), ("tests/test_science_pictures.py", "tests/test_render.py")),
    "cbam_viz.render": (
        ("_check_alpha", "_check_mask", "colorize", "overlay"),
        ("tests/test_science_pictures.py", "tests/test_render.py")),
    "cbam_viz.service.analysis": (("_draw",), ("tests/test_science_pictures.py",)),
}

# The bugs of the issue (34): each must fail at least one non-slow test. (module, old, new).
PLANTED_BUGS: dict[str, tuple[str, str, str]] = {
    "road imputer returns its input": (
        "cbam_viz.engine.faithfulness", "return NoisyLinearImputer()(image, keep)", "return image.clone()"),
    "library CAMs explain class 0": (
        "cbam_viz.engine.cam_library", "[ClassifierOutputTarget(t) for t in targets]",
        "[ClassifierOutputTarget(0) for t in targets]"),
    "ablation CAM correlation always 1": (
        "cbam_viz.research.gate_ablation", "corr = np.array([pearson(a, b) for a, b in zip(intact.cams, res.cams)])",
        "corr = np.ones(len(res.cams))"),
    "ablation prob_change sign flipped": (
        "cbam_viz.research.gate_ablation", '"prob_change": p - p0', '"prob_change": p0 - p'),
    "ablation counts no correct prediction": (
        "cbam_viz.research.ablation_report", "correct[(block, gate)] += (p.argmax(1) == y).tolist()",
        "correct[(block, gate)] += (p.argmax(1) == -1).tolist()"),
    "ablation intact accuracy never correct": (
        "cbam_viz.research.ablation_report", 'correct[("intact", "")] += (top[:, 0] == y).tolist()',
        'correct[("intact", "")] += (top[:, 0] == -1).tolist()'),
    "evaluate labels in sorted-folder order": (
        "cbam_viz.training.evaluate", "return [index[scan.classes[label]] for label in scan.labels]",
        "return list(scan.labels)"),
    "sanity passes always true": (
        "cbam_viz.research.sanity", '"passes": flags[m]} for m in result.methods}}', '"passes": True} for m in result.methods}}'),
    "channel-profiles picture blank": (
        "cbam_viz.research.channel_profiles", 'return im.convert("RGB")', 'return Image.new("RGB", im.size, "white")'),
    "resize_batch mirrors images": (
        "cbam_viz.training.data", 'mode="bilinear", align_corners=False, antialias=True)',
        'mode="bilinear", align_corners=False, antialias=True).flip(-1)'),
    "CBAM overlay drawn from the baseline CAM": (
        # on a lineup: every member's overlay drawn from the reference's CAM
        "cbam_viz.service.analysis", "render.overlay(image, m.cam, alpha=alpha)",
        "render.overlay(image, explanation.reference_model.cam, alpha=alpha)"),
    "library CAMs explain the first image's class": (
        "cbam_viz.engine.cam_library", "[ClassifierOutputTarget(t) for t in targets]",
        "[ClassifierOutputTarget(targets[0]) for t in targets]"),
}


# ------------------------------------------------------------------------------------ mutants


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int       # position among the module's mutants (stable for one version of the file)
    line: int
    col: int
    function: str
    description: str
    end_line: int = 0                 # last line of the mutated expression
    function_lines: tuple[int, int] = (0, 0)  # first and last line of the enclosing function


# Keyword arguments that only style a figure or a progress bar: a changed font size is no wrong
# number, and no test should pin it. Their values are not mutated.
COSMETIC_KEYWORDS = frozenset({"fontsize", "labelsize", "pad", "fraction", "figsize", "desc", "unit", "disable",
                               "progress"})

_BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
           ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BOOLOPS = {ast.And: ast.Or, ast.Or: ast.And}


def _sites(node: ast.AST) -> list[tuple[ast.AST, str, object]]:
    """Every (node, description, change) one mutation can make below ``node``, in source order.

    Skipped: docstrings, f-strings (messages), the arguments of ``raise`` (error wording),
    annotations and decorators, string constants (names and wording), :data:`COSMETIC_KEYWORDS`.
    """
    out: list[tuple[ast.AST, str, object]] = []

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.JoinedStr, ast.Raise)):
            return
        if isinstance(n, ast.keyword) and n.arg in COSMETIC_KEYWORDS:
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None]:
                visit(d)
            for stmt in body:
                visit(stmt)
            return
        if isinstance(n, ast.arg):
            return
        if isinstance(n, (ast.BinOp, ast.AugAssign)) and type(n.op) in _BINOPS:
            out.append((n, f"{type(n.op).__name__} -> {_BINOPS[type(n.op)].__name__}", "op"))
        elif isinstance(n, ast.Compare):
            for i, op in enumerate(n.ops):
                if type(op) in _CMPOPS:
                    out.append((n, f"{type(op).__name__} -> {_CMPOPS[type(op)].__name__}", i))
        elif isinstance(n, ast.BoolOp):
            out.append((n, f"{type(n.op).__name__} -> {_BOOLOPS[type(n.op)].__name__}", "op"))
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Not, ast.USub)):
            out.append((n, f"drop {type(n.op).__name__}", "drop"))
        elif isinstance(n, ast.Constant) and not isinstance(n.value, str):
            v = n.value
            if isinstance(v, bool):
                out.append((n, f"{v} -> {not v}", not v))
            elif isinstance(v, (int, float)):
                out.append((n, f"{v!r} -> {v + 1!r}", v + 1))
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.expr_context):
                continue
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child in n.decorator_list:
                continue
            if isinstance(n, ast.AnnAssign) and child is n.annotation:
                continue
            visit(child)

    visit(node)
    return out


def _functions(tree: ast.Module, names: tuple[str, ...] | None) -> list[tuple[str, ast.AST]]:
    """The (qualified name, node) of the functions to mutate (methods included), in source order."""
    found: list[tuple[str, ast.AST]] = []

    def walk(body, prefix: str) -> None:
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if names is None or n.name in names:
                    found.append((prefix + n.name, n))
            elif isinstance(n, ast.ClassDef):
                walk(n.body, prefix + n.name + ".")

    walk(tree.body, "")
    return found


def _source_path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def list_mutants(module: str) -> list[Mutant]:
    names, _ = TARGETS[module]
    tree = ast.parse(_source_path(module).read_text())
    mutants = []
    for qual, fn in _functions(tree, names):
        for node, desc, _ in _sites(fn):
            mutants.append(Mutant(module, len(mutants), node.lineno, node.col_offset, qual, desc,
                                  node.end_lineno or node.lineno, (fn.lineno, fn.end_lineno or fn.lineno)))
    return mutants


def mutated_code(module: str, index: int):
    """The module compiled with mutant ``index`` applied (a fresh parse: nothing shared)."""
    path = _source_path(module)
    tree = ast.parse(path.read_text())
    names, _ = TARGETS[module]
    sites = [s for _, fn in _functions(tree, names) for s in _sites(fn)]
    node, _, change = sites[index]
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = _BINOPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[change] = _CMPOPS[type(node.ops[change])]()
    elif isinstance(node, ast.BoolOp):
        node.op = _BOOLOPS[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):  # "drop": `not x` -> `x`, `-x` -> `+x`
        node.op = ast.UAdd() if isinstance(node.op, ast.USub) else _Identity()
    elif isinstance(node, ast.Constant):
        node.value = change
    tree = _DropIdentity().visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, str(path), "exec")


class _Identity(ast.unaryop):
    """Marker: the unary operator is removed (replaced by its operand) before compiling."""


class _DropIdentity(ast.NodeTransformer):
    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return node.operand if isinstance(node.op, _Identity) else node


def patched_code(module: str, old: str, new: str):
    """The module compiled with one text replacement (a planted bug); ``old`` must occur once."""
    path = _source_path(module)
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"planted bug no longer applies to {path.name}: {old!r} occurs {text.count(old)} times")
    return compile(text.replace(old, new), str(path), "exec")


# ------------------------------------------------------------------------------------ running


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``module`` from ``code`` (the mutant) instead of its file."""

    def __init__(self, module: str, code) -> None:
        self.module, self.code = module, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(_source_path(fullname)))

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__file__ = str(_source_path(self.module))
        exec(self.code, module.__dict__)


class _LineRecorder:
    """pytest plugin: which lines of one file each test executes (its own thread and new threads)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[str, set[int]] = {}
        self.current: set[int] = set()

    def _trace(self, frame, event, arg):
        if frame.f_code.co_filename != self.filename:
            return None
        current = self.current

        def local(frame, event, arg):
            if event == "line":
                current.add(frame.f_lineno)
            return local

        current.add(frame.f_lineno)
        return local

    def pytest_runtest_protocol(self, item, nextitem):
        import threading

        self.current = self.lines.setdefault(item.nodeid, set())
        sys.settrace(self._trace)
        threading.settrace(self._trace)

    def pytest_runtest_logfinish(self, nodeid, location):
        import threading

        sys.settrace(None)
        threading.settrace(None)


def run_tests(module: str, code, tests: tuple[str, ...], timeout: float,
              record: Path | None = None) -> tuple[str, float]:
    """Fork; in the child import ``code`` as ``module`` and run ``tests`` (files or test ids).
    ``(status, seconds)``: status ``killed`` (a test failed), ``survived``, or ``timeout``
    (counted as killed). ``record``: write ``{test id: [lines of module run]}`` there as JSON."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        rc = 3
        try:
            os.setpgid(0, 0)
            if code is not None:
                sys.meta_path.insert(0, _Finder(module, code))
            import pytest

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            plugins = [_LineRecorder(str(_source_path(module)))] if record else []
            rc = pytest.main([*tests, "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                              "-p", "no:randomly", "--no-header", "-W", "ignore"], plugins=plugins)
            if record:
                record.write_text(json.dumps({k: sorted(v) for k, v in plugins[0].lines.items()}))
        finally:
            os._exit(int(rc))
    deadline = t0 + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                rc = os.waitstatus_to_exitcode(status)
                return ("survived" if rc == 0 else "killed"), time.perf_counter() - t0
            if time.perf_counter() > deadline:
                return "timeout", time.perf_counter() - t0
            time.sleep(0.05)
    finally:  # a timeout, or this process interrupted: the child's whole group goes too
        if pid:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def covering_tests(m: Mutant, coverage: dict[str, list[int]], files: tuple[str, ...]) -> tuple[str, ...]:
    """The tests that run the mutated lines, in collection order; else those that run the
    enclosing function (a default argument: its line runs at import); else every test file."""
    lines = set(range(m.line, m.end_line + 1))
    chosen = [t for t, ran in coverage.items() if lines & set(ran)]
    if not chosen:
        lo, hi = m.function_lines
        chosen = [t for t, ran in coverage.items() if any(lo <= x <= hi for x in ran)]
    return tuple(chosen) or files


def _preload() -> None:
    """Import the heavy third-party libraries once, in the parent (never ``cbam_viz``: the child
    must import the mutant). No torch op runs here, so no thread pool exists when we fork."""
    import cv2  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    assert not any(m == "cbam_viz" or m.startswith("cbam_viz.") for m in sys.modules)


def _done(out: Path | None) -> dict[tuple[str, int], dict]:
    if out is None or not out.exists():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {(r["module"], r["index"]): r for r in rows}


def run_module(module: str, out: Path | None, *, timeout_factor: float = 4.0, limit: int | None = None,
               retry: bool = False, shard: tuple[int, int] = (0, 1), only: list[int] | None = None) -> None:
    import tempfile

    _, tests = TARGETS[module]
    tests = tuple(t for t in tests if (ROOT / t.split("::")[0]).exists())
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "coverage.json"
        status, base = run_tests(module, None, tests, timeout=3600, record=record)
        coverage = json.loads(record.read_text()) if record.exists() else {}
    print(f"{module}: {len(coverage)} tests of {' '.join(tests)} pass unmutated: {status == 'survived'} "
          f"({base:.0f} s, traced)", flush=True)
    if status != "survived":
        raise SystemExit(f"the tests of {module} fail without any mutant: fix them first")
    done = _done(out)
    mutants = [m for m in list_mutants(module)[:limit] if m.index % shard[1] == shard[0]]
    for m in mutants:
        if only and m.index not in only:
            continue
        previous = done.get((module, m.index), {}).get("status")
        if (previous is not None and not retry) or (retry and previous != "survived"):
            continue  # done already; or, when retrying, not a survivor
        chosen = covering_tests(m, coverage, tests)
        result, seconds = run_tests(module, mutated_code(module, m.index), chosen,
                                    timeout=max(60.0, timeout_factor * base))
        row = {**asdict(m), "status": result, "seconds": round(seconds, 1), "tests": len(chosen)}
        print(f"  #{m.index:3d} {m.function}:{m.line} {m.description}: {result} ({seconds:.0f} s, "
              f"{len(chosen)} tests)", flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def run_bugs(names: list[str] | None) -> int:
    """Each planted bug against its module's tests; exit status 1 if any survives."""
    survived = 0
    clean: set[str] = set()
    for name, (module, old, new) in PLANTED_BUGS.items():
        if names and name not in names:
            continue
        _, tests = TARGETS[module]
        tests = tuple(t for t in tests if (ROOT / t.split("::")[0]).exists())
        if module not in clean:  # a bug only counts as caught by tests that pass without it
            if run_tests(module, None, tests, timeout=1800)[0] != "survived":
                raise SystemExit(f"the tests of {module} fail without any bug: fix them first")
            clean.add(module)
        result, seconds = run_tests(module, patched_code(module, old, new), tests, timeout=1800)
        survived += result == "survived"
        print(f"{name:45s} {module:26s} {result:8s} ({seconds:.0f} s)", flush=True)
    return int(survived > 0)


def summary(path: Path) -> str:
    """Markdown: per module the mutants made, killed (timeouts included) and the survivors."""
    rows = list(_done(path).values())
    lines = ["| module | mutants | killed | survived | killed % |", "|---|---:|---:|---:|---:|"]
    total = killed = 0
    for module in TARGETS:
        mine = [r for r in rows if r["module"] == module]
        if not mine:
            continue
        k = sum(r["status"] != "survived" for r in mine)
        total, killed = total + len(mine), killed + k
        lines.append(f"| {module} | {len(mine)} | {k} | {len(mine) - k} | {100 * k / len(mine):.1f} |")
    if total:
        lines.append(f"| **all** | {total} | {killed} | {total - killed} | {100 * killed / total:.1f} |")
    lines += ["", "Survivors:", ""]
    for r in sorted(rows, key=lambda r: (r["module"], r["index"])):
        if r["status"] == "survived":
            lines.append(f"- `{r['module']}` #{r['index']} `{r['function']}` line {r['line']}: {r['description']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--module", action="append", help="short or full module name (default: every target)")
    p.add_argument("--out", type=Path, help="JSON-lines results (appended; a rerun resumes)")
    p.add_argument("--list", action="store_true", help="count the mutants per module and exit")
    p.add_argument("--bugs", nargs="*", help="run the planted bugs (all, or those named) instead")
    p.add_argument("--summary", type=Path, help="print the table of a results file and exit")
    p.add_argument("--limit", type=int, help="at most this many mutants per module (a smoke run)")
    p.add_argument("--shard", default="0/1", help="i/n: only the mutants whose index is i modulo n (parallel runs)")
    p.add_argument("--index", type=int, action="append", help="only this mutant (repeatable; one --module)")
    p.add_argument("--retry-survivors", action="store_true", help="run only the survivors in --out again (after new tests)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    sys.dont_write_bytecode = True  # no .pyc of a mutant, ever
    if args.summary:
        print(summary(args.summary))
        return 0
    modules = list(TARGETS)
    if args.module:
        modules = [m if m.startswith("cbam_viz.") else f"cbam_viz.{m}" for m in args.module]
        unknown = [m for m in modules if m not in TARGETS]
        if unknown:
            p.error(f"no target {unknown}; targets: {', '.join(TARGETS)}")
    if args.list:
        for m in modules:
            print(f"{m}: {len(list_mutants(m))} mutants")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` runs the cleanup in run_tests
    _preload()
    if args.bugs is not None:
        return run_bugs(args.bugs)
    for m in modules:
        shard = tuple(int(v) for v in args.shard.split("/"))
        run_module(m, args.out, limit=args.limit, retry=args.retry_survivors, shard=shard, only=args.index)
    if args.out:
        print(summary(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
