"""Sampler parameter checks and per-step plans (which rows each step evaluates)."""

import pytest

from personalize.errors import UserError
from personalize.sampling.samplers import SAMPLERS, configure, plan, total_rows

N = 20


def rows(name, steps=N, **params):
    return [step.cost for step in plan(configure(name, params, steps))]


def test_defaults_are_the_papers_points():
    expect = {
        "concept": {"w": 7.0}, "superclass": {"w": 7.0}, "mixed": {"w_c": 3.5, "w_s": 3.5},
        "switching": {"w": 7.0, "t_sw": 7}, "multistage": {"w_c": 4.0, "w_s": 3.0, "t_sw": 10},
        "masked": {"t_sw": 3, "q": 0.7, "w_c": 3.5, "w_s": 3.5, "w_c0": 0.0, "w_s0": 7.0,
                   "mask_source": "superclass"},
        "profusion": {"w_c": 3.5, "w_s": 3.5, "w_ref": 7.0, "r": 1.0, "refine_steps": 1},
        "photoswap": {"w": 7.0, "t_sf": 5, "t_cm": 15, "t_sm": 20},
    }
    assert set(SAMPLERS) == set(expect)
    for name, params in expect.items():
        assert dict(configure(name, {}, 50).params) == params


def test_cost_table_rows_per_step():
    """The cost table of docs/samplers.md: concept, superclass, switching 2; mixed 3; multi-stage and
    masked 2 in their first stage then 3; ProFusion 5; Photoswap 4 while it swaps."""
    assert rows("concept") == [2] * N
    assert rows("superclass") == [2] * N
    assert rows("switching") == [2] * N
    assert rows("mixed") == [3] * N
    assert rows("multistage", steps=50) == [2] * 10 + [3] * 40
    assert rows("masked", steps=50) == [2] * 3 + [3] * 47
    assert rows("profusion") == [5] * N
    assert rows("photoswap", t_sf=5, t_cm=15, t_sm=12) == [4] * 15 + [2] * 5
    assert rows("photoswap", steps=50) == [4] * 20 + [2] * 30


def test_step_defaults_keep_their_share_of_50_steps():
    assert configure("switching", {}, 20).params["t_sw"] == 3          # 7 of 50
    assert configure("photoswap", {}, 10).params == {"w": 7.0, "t_sf": 1, "t_cm": 3, "t_sm": 4}
    assert configure("multistage", {}, 100).params["t_sw"] == 20
    assert configure("switching", {"t_sw": 9}, 20).params["t_sw"] == 9  # given values are kept


def test_unused_branches_are_dropped():
    assert rows("mixed", w_s=0.0, w_c=7.0) == [2] * N            # S has weight 0
    assert rows("concept", w=1.0) == [1] * N                      # u cancels
    assert rows("masked", w_c0=1.0, w_s0=2.0) == [3] * N          # first stage reads C too
    assert rows("profusion", r=0.0) == [3] * N                    # fusion is the identity
    assert rows("profusion", refine_steps=3) == [3 + 3 * 2] * N
    assert rows("photoswap", t_sf=0, t_cm=0, t_sm=0) == [2] * N
    steps = plan(configure("switching", {"t_sw": 5}, N))
    assert [s.rows for s in steps[:5]] == [("u", "S")] * 5 and steps[5].rows == ("u", "C")
    assert total_rows(steps, num_images=3) == 2 * N * 3


def test_per_step_scales():
    ws = [0.0] * 10 + [3.5] * 10
    steps = plan(configure("mixed", {"w_s": ws, "w_c": 7.0}, N))
    assert [s.cost for s in steps] == [2] * 10 + [3] * 10
    assert steps[12].weights == {"C": 7.0, "S": 3.5}


@pytest.mark.parametrize("name,params,message", [
    ("nope", {}, "unknown sampler 'nope'"),
    ("mixed", {"w": 3}, "unknown parameter 'w' for sampler 'mixed'"),
    ("concept", {"w": "high"}, "parameter w: 'high' is not a number"),
    ("switching", {"t_sw": N + 1}, f"parameter t_sw: {N + 1} is outside [0, {N}]"),
    ("switching", {"t_sw": -1}, "outside"),
    ("switching", {"t_sw": 2.5}, "not a whole number"),
    ("mixed", {"w_c": [1.0] * (N - 1)}, f"one value per step ({N}), got {N - 1}"),
    ("mixed", {"w_c": [1.0] * (N - 1) + ["x"]}, "'x' in the per-step list is not a number"),
    ("masked", {"q": 1.5}, "parameter q: 1.5 is outside [0.0, 1.0]"),
    ("masked", {"mask_source": "both"}, "'both' is not one of superclass, concept"),
    ("photoswap", {"t_cm": -3}, "parameter t_cm: -3 is outside"),
    ("profusion", {"refine_steps": -1}, "refine_steps"),
    ("concept", {"w": float("nan")}, "is not a number"),
])
def test_bad_parameters(name, params, message):
    with pytest.raises(UserError, match=None) as info:
        configure(name, params, N)
    assert message in str(info.value)


def test_bad_steps():
    with pytest.raises(UserError, match="--steps"):
        configure("concept", {}, 0)


def test_each_sampler_has_one_documented_rule():
    """Every sampler's rule is one function registered on its spec, citing its paper."""
    for spec in SAMPLERS.values():
        assert spec.step_rule.__name__ == f"{spec.name}_step"
        assert "arXiv:" in spec.step_rule.__doc__


def test_readme_cost_column_is_the_derived_cost():
    """The README's cost column is what the plans cost; nothing is typed twice."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| .* \| .* \| ([^|]+) \|$", readme, re.M)}
    for spec in SAMPLERS.values():
        assert table[spec.name].strip() == spec.cost_summary(), spec.name


def test_cost_summary_follows_the_plan():
    """The summary changes when the plan changes (a parameter that moves the stage border)."""
    assert SAMPLERS["multistage"].cost_per_step(20) == rows("multistage", steps=20)
    assert SAMPLERS["photoswap"].cost_summary() == "4 (steps 0-19), then 2 (steps 20-49)"
    assert SAMPLERS["mixed"].describe()["rows_per_step"] == 3
