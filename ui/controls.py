"""Sampler parameter controls: one control per parameter name, shown for the samplers
that have it, with the study's ranges and defaults (docs/samplers.md)."""

from __future__ import annotations

import gradio as gr

from personalize.runs.recording import PARAM_NAMES, first_param
from personalize.sampling.samplers import SAMPLERS, default_for

STEP_MAX = 150


def create_controls(sampler: str, steps: int) -> dict[str, gr.components.Component]:
    controls = {}
    spec = SAMPLERS[sampler]
    for name in PARAM_NAMES:
        p = first_param(name)
        visible = any(q.name == name for q in spec.params)
        value = default_for(spec.param(name), steps) if visible else default_for(p, steps)
        label = f"{name}: {p.help}"
        if p.kind == "choice":
            controls[name] = gr.Radio(list(p.choices), value=value, label=label, visible=visible,
                                     elem_id=f"param-{name}")
        elif p.kind in ("steps", "int"):
            high = STEP_MAX if p.kind == "steps" else p.high
            controls[name] = gr.Slider(p.low, high, value=value, step=1, label=label, visible=visible,
                                      elem_id=f"param-{name}")
        else:
            step = 0.05 if p.kind in ("fraction", "float") else 0.5
            controls[name] = gr.Slider(p.low, p.high, value=value, step=step, label=label, visible=visible,
                                      elem_id=f"param-{name}")
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


def create_sampler_controls(sampler: str, steps: int, prefix: str = "") -> list[gr.components.Component]:
    """One control per parameter of `sampler`, in its table's order, labelled with the
    sampler's name (so that several samplers' controls can share a page)."""
    controls = []
    for p in SAMPLERS[sampler].params:
        value = default_for(p, steps)
        label = f"{sampler} · {p.name}: {p.help}"
        elem_id = f"{prefix}{sampler}-{p.name}"
        if p.kind == "choice":
            controls.append(gr.Radio(list(p.choices), value=value, label=label, elem_id=elem_id))
        elif p.kind in ("steps", "int"):
            high = STEP_MAX if p.kind == "steps" else p.high
            controls.append(gr.Slider(p.low, high, value=value, step=1, label=label, elem_id=elem_id))
        else:
            step = 0.05 if p.kind in ("fraction", "float") else 0.5
            controls.append(gr.Slider(p.low, p.high, value=value, step=step, label=label, elem_id=elem_id))
    return controls
