"""benchmarks/mutation.py keeps working as the code it mutates changes: its targets and planted bugs
still exist, and a mutant is the one change it claims to be (no pytest run here: that is the
harness's own, slow job; see docs/mutation.md)."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_harness", ROOT / "benchmarks" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_operators_skip_wording_and_cosmetics(mutation):
    fn = ast.parse('''
def f(a, b=2):
    """Docstring 1 < 2."""
    if a < 0:
        raise ValueError(f"bad {a + 1}")
    plot(a, fontsize=8)
    return not (a * b - 1 >= 0.5 and True) or -a
''').body[0]
    descriptions = [d for _, d, _ in mutation._sites(fn)]
    assert descriptions == ["2 -> 3", "Lt -> LtE", "0 -> 1", "Or -> And", "drop Not", "And -> Or", "GtE -> Gt",
                            "Sub -> Add", "Mult -> Div", "1 -> 2", "0.5 -> 1.5", "True -> False", "drop USub"]


def test_a_mutant_is_the_change_it_names(mutation):
    mutants = mutation.list_mutants("cbam_viz.engine.faithfulness")
    drop = next(m for m in mutants if m.function == "ConfidenceDrop.drop" and m.description == "Sub -> Add")
    namespace: dict = {"__name__": "mutant_faithfulness"}
    sys.modules["mutant_faithfulness"] = type(sys)("mutant_faithfulness")
    try:
        exec(mutation.mutated_code("cbam_viz.engine.faithfulness", drop.index), namespace)
    finally:
        sys.modules.pop("mutant_faithfulness", None)
    d = namespace["ConfidenceDrop"](0, 0.75, 0.25, 0.2, "mean", None)
    assert d.drop == 1.0  # before + after: the mutant, not the original 0.5
    assert [m.index for m in mutants] == list(range(len(mutants)))


def test_targets_and_planted_bugs_still_exist(mutation):
    for module, (functions, tests) in mutation.TARGETS.items():
        tree = ast.parse(mutation._source_path(module).read_text())
        found = {name.rsplit(".", 1)[-1] for name, _ in mutation._functions(tree, functions)}
        missing = set(functions or ()) - found
        assert not missing, f"benchmarks/mutation.py: {module} has no {sorted(missing)} any more"
        assert mutation.list_mutants(module), module
        assert any((ROOT / t.split("::")[0]).exists() for t in tests), module
    for name, (module, old, new) in mutation.PLANTED_BUGS.items():
        mutation.patched_code(module, old, new)  # SystemExit names the bug that no longer applies
