"""The eight samplers of the study: parameters, validation, and each run's per-step plan.

A sampler is data: `configure()` checks a user's parameters against the sampler's table
and `plan()` turns them into one `Step` per denoising step, saying which denoiser rows
that step evaluates and how their predictions combine. The loop in `engine.py` only
follows the plan, so no step ever evaluates a branch it does not use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from personalize.errors import UserError

MAX_STEPS = 10_000  # no scheduler trains on more timesteps; a plan never holds more Steps
U, C, S = "u", "C", "S"  # unconditional (negative prompt), concept prompt, superclass prompt
ROW_ORDER = (U, C, S)


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # scale | steps | fraction | float | int | choice
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def describe(self, steps: int | None = None) -> dict:
        high = steps if self.kind == "steps" and steps is not None else self.high
        out = {"name": self.name, "kind": self.kind, "default": self.default, "help": self.help}
        if self.kind == "choice":
            out["choices"] = list(self.choices)
        else:
            out["range"] = [self.low, "steps" if self.kind == "steps" and high is None else high]
        if self.kind == "scale":
            out["per_step_list"] = True
        if self.kind == "steps":
            out["default_is_for_50_steps"] = True  # scaled to the run's steps, see default_for
        return out


def _scale(name, default, help_, high=15.0):
    return Param(name, "scale", default, 0.0, high, help=help_)


def _steps(name, default, help_):
    return Param(name, "steps", default, 0, None, help=help_)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its parameters, its rule and the study's advice.

    `step_rule(config, i)` is the sampler's rule: the `Step` (branches to evaluate and how
    to combine them) of denoising step `i`. The cost per step is derived from it
    (`cost_per_step`), never typed by hand.
    """

    name: str
    title: str
    formula: str       # the rule in one line, for tables
    params: tuple[Param, ...]
    step_rule: Callable[["SamplerConfig", int], "Step"]
    when: str          # the study's advice (section 4)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def cost_per_step(self, steps: int = 50) -> list[int]:
        """Denoiser batch rows of each step of a run with the default parameters."""
        return [step.cost for step in plan(configure(self.name, {}, steps))]

    def cost_summary(self, steps: int = 50) -> str:
        """The per-step cost of the default plan in words: "3", or "2 (steps 0-9), then 3"."""
        runs: list[list[int]] = []  # [cost, first step, last step]
        for i, cost in enumerate(self.cost_per_step(steps)):
            if runs and runs[-1][0] == cost:
                runs[-1][2] = i
            else:
                runs.append([cost, i, i])
        if len(runs) == 1:
            return str(runs[0][0])
        return ", then ".join(f"{c} (steps {a}-{b})" if a != b else f"{c} (step {a})" for c, a, b in runs)

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "rule": self.formula,
                "rows_per_step": max(self.cost_per_step()), "rows": self.cost_summary(), "when": self.when,
                "params": [p.describe() for p in self.params]}


@dataclass(frozen=True)
class SamplerConfig:
    """One sampler with every parameter checked and filled in, for a run of `steps` steps."""

    name: str
    steps: int
    params: Mapping[str, Any]  # as given, defaults filled in (scales: number or per-step list)

    def __post_init__(self):
        spec = get_spec(self.name)
        unknown = sorted(set(self.params) - {p.name for p in spec.params})
        if unknown:
            raise UserError(f"unknown parameter {unknown[0]!r} for sampler {self.name!r}; "
                            f"accepted: {', '.join(p.name for p in spec.params)}")
        for p in spec.params:
            _check(p, self.params[p.name], self.steps)

    def value(self, name: str, step: int | None = None):
        """A parameter's value; scales at a given step (per-step lists are indexed)."""
        v = self.params[name]
        if isinstance(v, (list, tuple)):
            return float(v[step])
        return v

    def scale(self, name: str, step: int) -> float:
        return float(self.value(name, step))


def get_spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; accepted: {' | '.join(SAMPLERS)}")
    return SAMPLERS[name]


def configure(name: str, params: Mapping[str, Any] | None = None, steps: int = 50) -> SamplerConfig:
    """Check `params` for sampler `name` and fill in the study's defaults."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"--steps: {steps!r} is not a whole number of steps in [1, {MAX_STEPS}]")
    spec = get_spec(name)
    params = dict(params or {})
    filled = {p.name: params.pop(p.name, default_for(p, steps)) for p in spec.params}
    filled.update(params)  # unknown names stay, so the config's check reports them
    return SamplerConfig(name, steps, filled)


STUDY_STEPS = 50  # the study's step-count defaults are fractions of a 50-step run


def default_for(p: Param, steps: int):
    """A parameter's default for a run of `steps` steps: step counts keep their share of
    the study's 50-step trajectory (t_sw = 7 of 50 is 3 of 20), everything else is as is."""
    if p.kind == "steps":
        return min(steps, round(p.default * steps / STUDY_STEPS))
    return p.default


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(p: Param, v, steps: int) -> None:
    where = f"parameter {p.name}"
    if p.kind == "scale":
        if isinstance(v, (list, tuple)):
            if len(v) != steps:
                raise UserError(f"{where}: a per-step list needs one value per step ({steps}), got {len(v)}")
            bad = [x for x in v if not _is_number(x)]
            if bad:
                raise UserError(f"{where}: {bad[0]!r} in the per-step list is not a number")
            outside = [x for x in v if not p.low <= x <= p.high]
            if outside:
                raise UserError(f"{where}: {outside[0]} in the per-step list is outside [{p.low}, {p.high}]")
        elif not _is_number(v):
            raise UserError(f"{where}: {v!r} is not a number (or a JSON list of {steps} numbers)")
        elif not p.low <= v <= p.high:
            raise UserError(f"{where}: {v} is outside [{p.low}, {p.high}]")
    elif p.kind in ("steps", "int"):
        if not (_is_number(v) and float(v).is_integer()):
            raise UserError(f"{where}: {v!r} is not a whole number")
        high = steps if p.kind == "steps" else p.high
        if not p.low <= v <= high:
            raise UserError(f"{where}: {v} is outside [{p.low}, {high}]"
                            + (" (the number of steps)" if p.kind == "steps" else ""))
    elif p.kind in ("fraction", "float"):
        if not _is_number(v):
            raise UserError(f"{where}: {v!r} is not a number")
        if not p.low <= v <= p.high:
            raise UserError(f"{where}: {v} is outside [{p.low}, {p.high}]")
    elif p.kind == "choice":
        if v not in p.choices:
            raise UserError(f"{where}: {v!r} is not one of {', '.join(p.choices)}")


# ---------------------------------------------------------------------------------------
# The per-step plan


def rows_for(*weight_sets: Mapping[str, float]) -> tuple[str, ...]:
    """The branches the linear rules with these weights read: a branch weighted 0 is
    dropped, and the unconditional one too when every rule's weights sum to exactly 1."""
    used = {b for weights in weight_sets for b, w in weights.items() if w != 0}
    if any(sum(weights.values()) != 1 for weights in weight_sets):
        used.add(U)
    return tuple(b for b in ROW_ORDER if b in used)


def nonzero(weights: Mapping[str, float]) -> dict[str, float]:
    return {b: w for b, w in weights.items() if w != 0}


@dataclass(frozen=True)
class Mask:
    q: float
    source: str  # the branch whose map makes the mask: S or C


@dataclass(frozen=True)
class Fusion:
    """ProFusion's fusion step before the step's own update."""
    r: float
    weights: dict  # {C: w_ref}
    repeats: int
    rows: tuple[str, ...]


@dataclass(frozen=True)
class Swap:
    """Photoswap at one step: which attention quantities the concept rows take from the
    superclass rows."""
    features: bool    # self-attention output features (i < t_SF)
    self_maps: bool   # self-attention probabilities (i < t_SM)
    cross_maps: bool  # cross-attention probabilities (i < t_CM)


@dataclass(frozen=True)
class Step:
    """What one denoising step evaluates and how it combines the predictions.

    `rows` names the prompt of each group of rows of the one batched denoiser call. With
    `swap`, the call carries two trajectories, `[u, C]` on the concept latents and
    `[u, S]` on the superclass latents, guided with `weights` and `weights_s`.
    """

    rows: tuple[str, ...]
    weights: dict                       # guide() terms; with mask: inside the mask
    outside: dict | None = None         # masked: the rule outside the mask
    mask: Mask | None = None
    fusion: Fusion | None = None
    swap: Swap | None = None
    weights_s: dict | None = None       # photoswap: the superclass trajectory's rule

    @property
    def cost(self) -> int:
        """Denoiser batch rows per image."""
        fusion = self.fusion.repeats * len(self.fusion.rows) if self.fusion else 0
        return len(self.rows) + fusion


def masked_weights(w_c: float, w_s: float) -> tuple[dict, dict]:
    """Masked sampling's rules inside and outside the mask (eq. 10). As in the reference
    code, if either scale is 0 the inside rule is the concept rule with w_c + w_s."""
    inside = {C: w_c + w_s} if w_c == 0 or w_s == 0 else {C: w_c, S: w_s}
    return inside, {S: w_c + w_s}


def _linear(weights: Mapping[str, float]) -> Step:
    weights = nonzero(weights)
    return Step(rows_for(weights), weights)


def plan(config: SamplerConfig) -> list[Step]:
    """One Step per denoising step `i = 0 .. N-1`, from the sampler's registered rule.
    `configure` bounds the steps (MAX_STEPS), so a plan's size is bounded too."""
    if config.steps > MAX_STEPS:
        raise UserError(f"--steps: {config.steps} is over {MAX_STEPS}; no plan is built for it")
    rule = get_spec(config.name).step_rule
    return [rule(config, i) for i in range(config.steps)]


# ---------------------------------------------------------------------------------------
# The rules, one function per sampler. Equation numbers refer to the study,
# arXiv:2502.05895; each rule is classifier-free guidance (arXiv:2207.12598) over the
# branches u (negative prompt), C (concept prompt) and S (superclass prompt).


def concept_step(cfg: SamplerConfig, i: int) -> Step:
    """Concept sampling, arXiv:2502.05895 eq. 4: `e_u + w (e_C - e_u)`."""
    return _linear({C: cfg.scale("w", i)})


def superclass_step(cfg: SamplerConfig, i: int) -> Step:
    """Superclass sampling, arXiv:2502.05895 eq. 5: `e_u + w (e_S - e_u)`."""
    return _linear({S: cfg.scale("w", i)})


def mixed_step(cfg: SamplerConfig, i: int) -> Step:
    """Mixed sampling, arXiv:2502.05895 eq. 6 (ProFusion's guidance, arXiv:2305.13579):
    `e_u + w_s (e_S - e_u) + w_c (e_C - e_u)`."""
    return _linear({C: cfg.scale("w_c", i), S: cfg.scale("w_s", i)})


def switching_step(cfg: SamplerConfig, i: int) -> Step:
    """Switching, arXiv:2502.05895 eq. 7: the superclass rule with `w` for `i < t_sw`, then
    the concept rule with `w`."""
    return _linear({S: cfg.scale("w", i)} if i < cfg.value("t_sw") else {C: cfg.scale("w", i)})


def multistage_step(cfg: SamplerConfig, i: int) -> Step:
    """Multi-stage, arXiv:2502.05895 eq. 8 as the authors' code runs it: for `i < t_sw`
    `e_u + (w_c + w_s)(e_S - e_u)` (the superclass prompt, where the paper prints the
    concept one), then mixed."""
    if i < cfg.value("t_sw"):
        return _linear({S: cfg.scale("w_c", i) + cfg.scale("w_s", i)})
    return mixed_step(cfg, i)


def masked_step(cfg: SamplerConfig, i: int) -> Step:
    """Masked sampling, arXiv:2502.05895 eq. 9-11: for `i < t_sw`
    `e_u + w_c0 (e_C - e_u) + w_s0 (e_S - e_u)`; then `M * mixed + (1 - M) * e_u +
    (w_c + w_s)(e_S - e_u)` with `M = A > quantile(A, q)` from the concept token's
    cross-attention map `A` (see `guidance.quantile_mask`, `masked_weights`)."""
    if i < cfg.value("t_sw"):
        return _linear({C: cfg.scale("w_c0", i), S: cfg.scale("w_s0", i)})
    inside, outside = masked_weights(cfg.scale("w_c", i), cfg.scale("w_s", i))
    inside, outside = nonzero(inside), nonzero(outside)
    source = S if cfg.value("mask_source") == "superclass" else C
    rows = tuple(b for b in ROW_ORDER if b in set(rows_for(inside, outside)) | {source})
    return Step(rows, inside, outside=outside, mask=Mask(float(cfg.value("q")), source))


def profusion_step(cfg: SamplerConfig, i: int) -> Step:
    """ProFusion, arXiv:2305.13579 (the study's port, arXiv:2502.05895): a fusion step with
    `e_u + w_ref (e_C - e_u)` and strength `r` (`guidance.fusion_update`), then the mixed
    rule at the same timestep. With `r = 0` or no repeats it is mixed sampling."""
    main = mixed_step(cfg, i)
    r, repeats = float(cfg.value("r")), int(cfg.value("refine_steps"))
    if r == 0 or repeats == 0:  # the fusion step is the identity
        return main
    ref = nonzero({C: cfg.scale("w_ref", i)})
    return Step(main.rows, main.weights, fusion=Fusion(r, ref, repeats, rows_for(ref)))


def photoswap_step(cfg: SamplerConfig, i: int) -> Step:
    """Photoswap, arXiv:2305.18286 (the study's port): the concept trajectory, guided with
    `w` on `e_C`, takes self-attention features (`i < t_sf`), self-attention maps
    (`i < t_sm`) and cross-attention maps (`i < t_cm`) from a superclass trajectory guided
    with `w` on `e_S`; the two go through the denoiser together as `[u, C, u, S]`."""
    swap = Swap(i < cfg.value("t_sf"), i < cfg.value("t_sm"), i < cfg.value("t_cm"))
    if not (swap.features or swap.self_maps or swap.cross_maps):
        return concept_step(cfg, i)  # the superclass trajectory no longer feeds the concept one
    return Step((U, C, U, S), {C: cfg.scale("w", i)}, swap=swap, weights_s={S: cfg.scale("w", i)})


def reaches_into_attention(steps: list[Step]) -> bool:
    """Whether a plan works inside the denoiser's attention (masked sampling's maps,
    Photoswap's swaps): it needs the concept token's position and Python processors."""
    return any(s.mask or s.swap for s in steps)


def total_rows(steps: list[Step], num_images: int = 1) -> int:
    return sum(step.cost for step in steps) * num_images


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("concept", "Concept", "e_u + w (e_C - e_u)  (eq. 4)",
                (_scale("w", 7.0, "guidance scale"),), concept_step,
                "The fine-tuned model as it is: best concept fidelity, often loses the prompt's context."),
    SamplerSpec("superclass", "Superclass", "e_u + w (e_S - e_u)  (eq. 5)",
                (_scale("w", 7.0, "guidance scale"),), superclass_step,
                "Follows the prompt, but draws a random member of the class, not your concept."),
    SamplerSpec("mixed", "Mixed", "e_u + w_s (e_S - e_u) + w_c (e_C - e_u)  (eq. 6)",
                (_scale("w_c", 3.5, "concept guidance scale"), _scale("w_s", 3.5, "superclass guidance scale")),
                mixed_step,
                "The study's recommendation: the most stable balance of concept and context, at 1.5x the batch."),
    SamplerSpec("switching", "Switching", "i < t_sw: superclass rule, else concept rule  (eq. 7)",
                (_scale("w", 7.0, "guidance scale"), _steps("t_sw", 7, "steps sampled with the superclass prompt")),
                switching_step,
                "Free (no extra compute) and raises text similarity; can lose the concept's identity."),
    SamplerSpec("multistage", "Multi-stage", "i < t_sw: e_u + (w_c + w_s)(e_S - e_u), else mixed  (eq. 8)",
                (_scale("w_c", 4.0, "concept guidance scale (second stage)"),
                 _scale("w_s", 3.0, "superclass guidance scale"),
                 _steps("t_sw", 10, "steps of the superclass-only first stage")),
                multistage_step,
                "Between switching and mixed; only large t_sw crosses mixed's frontier, at low fidelity."),
    SamplerSpec("masked", "Masked", "i < t_sw: e_u + w_c0 (e_C - e_u) + w_s0 (e_S - e_u); "
                "else M * mixed + (1 - M) * superclass(w_c + w_s)  (eq. 9-11)",
                (_steps("t_sw", 3, "steps of the first stage"),
                 Param("q", "fraction", 0.7, 0.0, 1.0, help="mask quantile: larger q, smaller concept region"),
                 _scale("w_c", 3.5, "concept guidance scale inside the mask"),
                 _scale("w_s", 3.5, "superclass guidance scale inside the mask"),
                 _scale("w_c0", 0.0, "concept guidance scale of the first stage"),
                 _scale("w_s0", 7.0, "superclass guidance scale of the first stage"),
                 Param("mask_source", "choice", "superclass", choices=("superclass", "concept"),
                       help="branch whose cross-attention map makes the mask")),
                masked_step,
                "Can beat mixed where it struggles, but its masks are noisy and results unstable; needs tuning."),
    SamplerSpec("profusion", "ProFusion", "fusion step (e_u + w_ref (e_C - e_u)), then mixed; DDIM only",
                (_scale("w_c", 3.5, "concept guidance scale of the mixed step"),
                 _scale("w_s", 3.5, "superclass guidance scale of the mixed step"),
                 _scale("w_ref", 7.0, "concept guidance scale of the fusion step"),
                 Param("r", "float", 1.0, 0.0, 1.0, help="fusion strength (0: mixed sampling)"),
                 Param("refine_steps", "int", 1, 0, 5, help="fusion repeats per step")),
                profusion_step,
                "Keeps concept fidelity high and improves text similarity less than mixed, at twice the compute."),
    SamplerSpec("photoswap", "Photoswap", "concept trajectory with attention from the superclass trajectory",
                (_scale("w", 7.0, "guidance scale of both trajectories"),
                 _steps("t_sf", 5, "steps swapping self-attention features"),
                 _steps("t_cm", 15, "steps swapping cross-attention maps"),
                 _steps("t_sm", 20, "steps swapping self-attention maps")),
                photoswap_step,
                "Nearly indistinguishable from switching, at twice its batch."),
)}
