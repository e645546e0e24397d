"""Sampler parameter controls: one control per parameter name, shown for the samplers
that have it, with the study's ranges and defaults (docs/samplers.md)."""

from __future__ import annotations

import gradio as gr

from personalize.sampling.samplers import SAMPLERS, default_for

STEP_MAX = 150


def parameter_names() -> list[str]:
    names = []
    for spec in SAMPLERS.values():
        names += [p.name for p in spec.params if p.name not in names]
    return names


PARAM_NAMES = parameter_names()


def _first_param(name):
    return next(p for s in SAMPLERS.values() for p in s.params if p.name == name)


def create_controls(sampler: str, steps: int) -> dict[str, gr.components.Component]:
    controls = {}
    spec = SAMPLERS[sampler]
    for name in PARAM_NAMES:
        p = _first_param(name)
        visible = any(q.name == name for q in spec.params)
        value = default_for(spec.param(name), steps) if visible else default_for(p, steps)
        label = f"{name}: {p.help}"
        if p.kind == "choice":
            controls[name] = gr.Radio(list(p.choices), value=value, label=label, visible=visible)
        elif p.kind in ("steps", "int"):
            high = STEP_MAX if p.kind == "steps" else p.high
            controls[name] = gr.Slider(p.low, high, value=value, step=1, label=label, visible=visible)
        else:
            step = 0.05 if p.kind in ("fraction", "float") else 0.5
            controls[name] = gr.Slider(p.low, p.high, value=value, step=step, label=label, visible=visible)
    return controls


def control_updates(sampler: str, steps: int) -> list:
    """Show the sampler's own controls, at its defaults for this many steps."""
    spec = SAMPLERS.get(sampler)
    updates = []
    for name in PARAM_NAMES:
        mine = spec is not None and any(p.name == name for p in spec.params)
        updates.append(gr.update(visible=mine, value=default_for(spec.param(name), steps)) if mine
                       else gr.update(visible=False))
    return updates


def params_from(sampler: str, values) -> dict:
    """The parameters of `sampler` from the values of all controls (in PARAM_NAMES order)."""
    spec = SAMPLERS.get(sampler)
    if spec is None:
        return {}
    own = {p.name: p for p in spec.params}
    out = {}
    for name, value in zip(PARAM_NAMES, values):
        if name in own:
            out[name] = int(value) if own[name].kind in ("steps", "int") else value
    return out
