"""The app's live instrument, with no UI in it: one sampler between its two ends.

A slider change asks for one run of the chosen sampler; the concept-sampling and
superclass-sampling images of the same prompt and seed (the two ends, arXiv:2502.05895
section 4) are cached per prompt and seed, so only the chosen sampler runs. A newer
request of the same user supersedes the older one, which stops at its next step
(`Superseded` is `engine.run`'s `stop`). A sweep runs the chosen sampler over one
parameter's range in one batched denoising loop when its plans are linear rules
(`run_points`). Every image is scored (IS, TS) with the model's metric model and, on a
world (docs/world.md), judged for concept and context.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from PIL import Image

from personalize.errors import UserError
from personalize.evaluation.metrics import image_scores, load_metric_models
from personalize.models.loading import load_pipeline
from personalize.prompts import fill, remove_concept
from personalize.runs import request as runs
from personalize.runs.lab import Concept, Finished, Lab, StepUpdate
from personalize.runs.runcard import run_card, write_run
from personalize.sampling import engine
from personalize.sampling.samplers import SAMPLERS, SamplerConfig, default_for, plan
from personalize.world import judge as J
from personalize.world.paths import is_world, world_concept
from personalize.world.scene import CONCEPTS

ENDS = ("concept", "superclass")   # the two ends every sampler sits between
SWEEP_POINTS = 8
SCALE_SWEEP = (0.0, 7.0)           # the study's range of a guidance scale in its sweeps


@dataclass
class Shot:
    """One finished image with its run card (scores included) and, for masked sampling,
    its final cross-attention mask."""
    image: Image.Image
    card: dict
    mask: Image.Image | None = None
    images: list = field(default_factory=list)   # every image of the run (the first is `image`)

    @property
    def sampler(self) -> str:
        return self.card["sampler"]

    @property
    def params(self) -> dict:
        return self.card["params"]


@dataclass
class Tickets:
    """A request counter: each new request supersedes the older ones, whose runs stop at
    their next step. A plain number, so that the state holding it can be copied and
    pickled (a threading.Event cannot, and ZeroGPU pickles a run's arguments)."""
    latest: int = 0

    def new_request(self) -> int:
        """A ticket for a new request; every older ticket is superseded from now on."""
        self.latest += 1
        return self.latest

    def stop_for(self, ticket: int) -> "Superseded":
        return Superseded(self, int(ticket))


@dataclass
class LiveState(Tickets):
    """One user's live session (the app keeps it in `gr.State`): the request counter, the
    cached ends, the chosen sampler's runs and the last sweep."""
    ends: dict = field(default_factory=dict)        # key -> (concept Shot, superclass Shot)
    ends_shown: tuple | None = None                 # the ends the page shows (not sent again)
    shots: list = field(default_factory=list)       # the chosen sampler's finished runs, newest last
    sweep: list = field(default_factory=list)       # the last sweep's Shots
    sweep_param: str | None = None
    finished: int = 0                               # runs that ran to the end
    superseded: int = 0                             # runs stopped by a newer request


class Superseded:
    """`engine.run`'s `stop` for a live request: set once a newer request came (or when
    set by hand, as `Lab.stream` does when its consumer goes away)."""

    def __init__(self, state: Tickets, ticket: int):
        self.state, self.ticket, self._set = state, ticket, False

    def is_set(self) -> bool:
        return self._set or self.state.latest != self.ticket

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False


# ---------------------------------------------------------------------------------------
# Parameters


def params_of(sampler: str, values: list) -> dict:
    """A sampler's parameters from one value per parameter, in its table's order (a
    control per parameter): step counts and integers as int."""
    spec = SAMPLERS[sampler]
    return {p.name: int(v) if p.kind in ("steps", "int") else v for p, v in zip(spec.params, values)}


def sweep_values(sampler: str, name: str, steps: int, points: int = SWEEP_POINTS) -> list:
    """The values a sweep of one parameter visits: a guidance scale over the study's 0..7,
    a step count over 0..steps, a fraction over its range, every choice of a choice."""
    p = SAMPLERS[sampler].param(name)
    if points < 2:
        raise UserError(f"sweep: {points} points; a curve needs at least 2")
    if p.kind == "choice":
        return list(p.choices)
    low, high = SCALE_SWEEP if p.kind == "scale" else (p.low, steps if p.kind == "steps" else p.high)
    values = [low + (high - low) * k / (points - 1) for k in range(points)]
    if p.kind in ("steps", "int"):
        return sorted({int(round(v)) for v in values})
    return [round(v, 4) for v in values]


def is_linear(config: SamplerConfig) -> bool:
    """Whether every step of the plan is a linear rule (no mask, fusion or swap), so that
    several of them can share one denoiser call."""
    return not any(s.mask or s.fusion or s.swap for s in plan(config))


# ---------------------------------------------------------------------------------------
# Several linear sampler points, one image each, in one loop


def run_points(pipe, prompts, configs: list[SamplerConfig], *, seed: int, height: int | None = None,
               width: int | None = None, negative_prompt: str = "", runtime: str = "torch") -> list[engine.RunResult]:
    """One image per config, all from the same seed, as `engine.run` would make each: the
    configs are lanes of one loop, whose every step evaluates the union of their rows once
    and combines them per config.

    The configs' plans must be linear (`is_linear`) and of the same number of steps."""
    if not configs:
        return []
    if len({c.steps for c in configs}) != 1:
        raise UserError("run_points: the configs must have the same number of steps")
    if not all(is_linear(c) for c in configs):
        raise UserError("run_points: masked, ProFusion and Photoswap plans run one at a time")
    lanes = [engine.Lane(prompts, seed, plan(c)) for c in configs]
    result = engine.denoise(pipe, lanes, height=height, width=width, negative_prompt=negative_prompt,
                            runtime=runtime)
    seconds = result.seconds / len(configs)
    return [engine.RunResult([result.images[k]], result.latents[k:k + 1], result.rows[k], seconds, None,
                             result.step_rows[k], result.size, result.runtime) for k in range(len(configs))]


# ---------------------------------------------------------------------------------------
# The instrument


class Live:
    """The live runs of one app (one model); every per-user thing is in a LiveState."""

    def __init__(self, lab: Lab, *, display: int = 256):
        self.lab = lab
        self.world, self.metrics = lab.world, lab.metrics
        self.display = display

    # -- requests -----------------------------------------------------------------------
    def request(self, concept: Concept, prompt: str, sampler: str, params: dict, *, seed: int, steps: int,
                size: int | None = None, negative_prompt: str = "", num_images: int = 1) -> runs.Prepared:
        return self.lab.request(concept, prompt, sampler, params, seed=int(seed), steps=int(steps),
                                negative_prompt=negative_prompt, size=int(size) if size else None,
                                num_images=int(num_images))

    def ends(self, state: LiveState, concept: Concept, prompt: str, *, seed: int, steps: int,
             size: int | None = None, negative_prompt: str = "") -> tuple[Shot, Shot]:
        """Concept and superclass sampling (defaults) of this prompt and seed, made once per
        prompt, seed and settings and kept in `state`."""
        key = (self.lab.model, concept.phrase, concept.superclass, concept.weights, tuple(concept.references),
               prompt, int(seed), int(steps), size, negative_prompt)
        if key not in state.ends:
            preps = [self.request(concept, prompt, name, {}, seed=seed, steps=steps, size=size,
                                  negative_prompt=negative_prompt) for name in ENDS]
            state.ends = {key: tuple(self.batch(concept, preps))}  # one prompt and seed at a time
        return state.ends[key]

    def batch(self, concept: Concept, preps: list[runs.Prepared]) -> list[Shot]:
        """Runs of one prompt, seed and size (different samplers or parameters), scored; in one
        loop where the plans are linear, else one after another."""
        req = preps[0].request
        configs = [p.config for p in preps]
        if all(is_linear(c) for c in configs):
            pipe = self._pipe(preps[0])
            results = run_points(pipe, preps[0].prompts, configs, seed=req.seed, height=req.height,
                                 width=req.width, negative_prompt=req.negative_prompt, runtime=req.runtime)
            cards = [self._card(p, r, type(pipe.scheduler).__name__) for p, r in zip(preps, results)]
            return [self.finish(concept, r.images, c) for r, c in zip(results, cards)]
        return [self._one(concept, p) for p in preps]

    def _one(self, concept: Concept, prep: runs.Prepared) -> Shot:
        result, card = runs.execute(prep)
        return self.finish(concept, result.images, card)

    def stream(self, concept: Concept, prep: runs.Prepared, stop) -> Iterator[StepUpdate | Shot]:
        """The chosen sampler's run: a StepUpdate after every step (previews, and for masked
        sampling the attention map and mask), then the scored Shot. `stop` (a Superseded)
        ends it at the next step with `Stopped`."""
        mask = None
        for item in self.lab.stream(prep, stop):
            if isinstance(item, Finished):
                shot = self.finish(concept, item.images, item.card)
                shot.mask = mask
                yield shot
            else:
                if item.mask is not None:
                    mask = item.mask[0]
                yield item

    def sweep(self, state: LiveState, concept: Concept, prep: runs.Prepared, name: str,
              points: int = SWEEP_POINTS) -> list[Shot]:
        """The chosen sampler over one parameter's range (`sweep_values`), the others as
        given; kept in `state` as the last sweep."""
        req = prep.request
        values = sweep_values(req.sampler, name, req.steps, points)
        preps = [self.request(concept, req.prompt, req.sampler, {**prep.config.params, name: v}, seed=req.seed,
                              steps=req.steps, size=req.height, negative_prompt=req.negative_prompt)
                 for v in values]
        state.sweep, state.sweep_param = self.batch(concept, preps), name
        return state.sweep

    def _pipe(self, prep: runs.Prepared):
        req = prep.request
        pipe = load_pipeline(prep.model, device=req.device, dtype=req.dtype, scheduler=req.scheduler)
        runs.use_concept(pipe, req.concept, prep.concept_phrase, req.concept_scale)
        return pipe

    def _card(self, prep: runs.Prepared, result: engine.RunResult, scheduler: str) -> dict:
        req = prep.request
        height, width = result.size
        concept = None if req.concept is None else {"path": req.concept, "scale": req.concept_scale}
        return run_card(config=prep.config, prompts=prep.prompts, negative_prompt=req.negative_prompt,
                        concept_phrase=prep.concept_phrase, superclass=prep.superclass, seed=req.seed,
                        num_images=1, height=height, width=width, model=req.model or prep.label,
                        concept=concept, scheduler=scheduler, device=req.device, dtype=req.dtype, result=result)

    # -- scores -------------------------------------------------------------------------
    def finish(self, concept: Concept, images: list, card: dict) -> Shot:
        """A Shot of a finished run, its card carrying the first image's scores."""
        return Shot(images[0], {**card, **self.score(concept, card, images[0])}, images=list(images))

    def score(self, concept: Concept, card: dict, image: Image.Image) -> dict:
        """IS (None without reference images) and TS of one image with this model's metric
        model; on a world also the judge's `concept_ok` (does it show the concept?) and
        `context_ok` (does it follow the prompt's context or colour?), None where the prompt
        is not one the judge reads."""

        models = load_metric_models(self.metrics)
        template = card["prompt_template"]
        generated = models.clip_images([image])
        texts = models.clip_texts([remove_concept(template), fill(template, concept.superclass)])
        references = [Image.open(p) for p in concept.references]
        ref_clip = models.clip_images(references) if references else generated[:0]
        scores = image_scores(generated, ref_clip, texts[0], texts[1])
        out = {"is": scores["is"][0] if references else None, "ts": scores["ts"][0], "ts_class": scores["ts_class"][0],
               "metrics": models.describe(), "metrics_random": models.random_weights,
               "concept_ok": None, "context_ok": None}
        if self.world:
            out.update(self.verdicts(concept, card, image))
        return out

    def verdicts(self, concept: Concept, card: dict, image: Image.Image) -> dict:
        key = next((k for k, c in CONCEPTS.items() if c["superclass"] == concept.superclass), None)
        phrases = {key: concept.phrase} if key else {}
        prompt = card["prompts"]["concept"] if card["sampler"] != "superclass" else card["prompts"]["superclass"]
        try:
            v = J.judge(image, prompt, phrases)
        except ValueError:  # not a prompt of the world
            return {}
        return {"concept_ok": v.is_concept.get(key) if key else None,
                "context_ok": v.colour_ok if v.colour_ok is not None else v.context_ok}

    # -- showing ------------------------------------------------------------------------
    def shown(self, image: Image.Image) -> Image.Image:
        """An image at the display size: small images scaled up with nearest neighbour (pixel
        art stays sharp), large ones as they are."""
        return show_at(image, self.display)

    def record(self, shot: Shot, history: list) -> str:
        """Write the run (images, run.json) to a fresh folder the app serves, add its card to
        `history`; returns the run.json path. The card's `images` become the served paths."""
        out = tempfile.mkdtemp(prefix="personalize-run-")
        names = write_run(out, shot.card, shot.images)["images"]
        shot.card["images"] = [f"{out}/{name}" for name in names]
        history.append(shot.card)
        return f"{out}/run.json"


def show_at(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled up by a whole factor (nearest neighbour) to about `side` pixels."""
    factor = max(1, side // max(image.width, image.height))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def overlay(image: Image.Image, mask: Image.Image | None, alpha: float = 0.45) -> Image.Image:
    """The mask (grey, any size) over the image in red; the image as it is without a mask."""
    if mask is None:
        return image
    m = mask.convert("L").resize(image.size, Image.NEAREST).point(lambda v: int(255 * alpha) if v > 127 else 0)
    red = Image.new("RGB", image.size, (230, 30, 30))
    return Image.composite(red, image.convert("RGB"), m)


def describe(shot: Shot | dict) -> str:
    """The sampler and its parameters in words (alt text, captions, hover), of a Shot or a
    run card."""
    card = shot.card if isinstance(shot, Shot) else shot
    params = ", ".join(f"{k}={_short(v)}" for k, v in card["params"].items())
    return f"{card['sampler']} sampling" + (f" ({params})" if params else "")


def scores_text(shot: Shot | dict) -> str:
    """IS, TS, the judge's verdicts where there are any, and the cost, in one line."""
    card = shot.card if isinstance(shot, Shot) else shot

    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    def verdict(v):
        return "n/a" if v is None else ("yes" if v else "no")
    parts = [f"IS {num(card.get('is'))}", f"TS {num(card.get('ts'))}"]
    if card.get("concept_ok") is not None or card.get("context_ok") is not None:
        parts += [f"concept {verdict(card.get('concept_ok'))}", f"context {verdict(card.get('context_ok'))}"]
    parts.append(f"{card['denoiser_rows']} rows, {card['seconds']:.2f} s")
    return " · ".join(parts)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[per step]"
    return str(v)


def default_params(sampler: str, steps: int) -> dict:
    spec = SAMPLERS[sampler]
    return {p.name: default_for(p, steps) for p in spec.params}


# ---------------------------------------------------------------------------------------
# The chart


def chart(state: LiveState, background: list[dict] = (), *, title: str = "IS / TS: drag a slider, watch the point move"):
    """This session's live points on the IS/TS plane (plotly): the two ends, every run of
    the chosen sampler, the current one highlighted and linked to the previous one, and
    the last sweep as a curve."""

    fig = go.Figure()
    if background:
        from personalize.evaluation.pareto import figure
        for trace in figure(list(background)).data:
            trace.update(opacity=0.35, legendgroup="background", name=f"{trace.name} (csv)")
            fig.add_trace(trace)
    scored = [s for s in state.shots if s.card.get("is") is not None]
    if state.ends:
        ends = next(iter(state.ends.values()))
        for shot, symbol in zip(ends, ("star", "diamond")):
            if shot.card.get("is") is not None:
                fig.add_trace(go.Scatter(x=[shot.card["ts"]], y=[shot.card["is"]], mode="markers",
                                         name=f"{shot.sampler} sampling", text=[describe(shot)],
                                         marker=dict(symbol=symbol, size=14), hovertemplate="%{text}<extra></extra>"))
    if state.sweep:
        pts = [s for s in state.sweep if s.card.get("is") is not None]
        fig.add_trace(go.Scatter(x=[s.card["ts"] for s in pts], y=[s.card["is"] for s in pts], mode="lines+markers+text",
                                 name=f"sweep: {state.sweep_param}", text=[_short(s.params[state.sweep_param]) for s in pts],
                                 textposition="top center", hovertext=[describe(s) for s in pts],
                                 hovertemplate="%{hovertext}<extra></extra>"))
    if scored:
        fig.add_trace(go.Scatter(x=[s.card["ts"] for s in scored], y=[s.card["is"] for s in scored], mode="markers",
                                 name="this session", text=[describe(s) for s in scored],
                                 marker=dict(color="lightgrey", size=8), hovertemplate="%{text}<extra></extra>"))
        if len(scored) > 1:
            a, b = scored[-2], scored[-1]
            fig.add_trace(go.Scatter(x=[a.card["ts"], b.card["ts"]], y=[a.card["is"], b.card["is"]],
                                     mode="lines", name="previous → current", line=dict(color="grey", dash="dot"),
                                     hoverinfo="skip"))
            fig.add_annotation(x=b.card["ts"], y=b.card["is"], ax=a.card["ts"], ay=a.card["is"], xref="x", yref="y",
                               axref="x", ayref="y", showarrow=True, arrowhead=3, arrowcolor="grey", text="")
        cur = scored[-1]
        fig.add_trace(go.Scatter(x=[cur.card["ts"]], y=[cur.card["is"]], mode="markers", name="current",
                                 text=[describe(cur)], marker=dict(color="crimson", size=16, line=dict(width=2)),
                                 hovertemplate="%{text}<extra></extra>"))
    random = any(s.card.get("metrics_random") for s in scored + list(state.sweep))
    fig.update_layout(title=title + ("<br><sup>random-weight metric model: not the study's numbers</sup>"
                                     if random else ""),
                      xaxis_title="TS (prompt following)", yaxis_title="IS (concept fidelity)",
                      template="plotly_white", margin=dict(l=50, r=10, t=40, b=40), height=265,
                      legend=dict(font=dict(size=10)))
    return fig


def make_lab(model: str | None = None, *, concept: str | None = None, concept_phrase: str | None = None,
             superclass: str | None = None, device: str = "cpu", dtype: str = "float32",
             concepts_dir: str | None = None) -> Lab:
    """A Lab as the app makes it: on a world with no `concept` given, the world's own first
    concept with its phrase, superclass and reference images (so IS has references).
    `concepts_dir` is the folder whose concepts the Concept tab's path box may name."""
    reason = None
    if model is None:
        from personalize.models.loading import default_model
        model, reason = default_model()
    world = world_concept(model) if concept is None else None
    if world is None:
        lab = Lab(model, concept=concept, concept_phrase=concept_phrase, superclass=superclass, device=device,
                  dtype=dtype, concepts_dir=concepts_dir)
    else:
        lab = Lab(model, concept=world["weights"], concept_phrase=concept_phrase or world["phrase"],
                  superclass=superclass or world["superclass"], device=device, dtype=dtype,
                  concepts_dir=concepts_dir)
        lab.default_concept.references = list(world["references"])
    lab.reason = reason or lab.reason
    return lab
