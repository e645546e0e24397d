"""Compare: one prompt and seed through several samplers, side by side, with costs and
scores; each chosen sampler has its own sliders."""

from __future__ import annotations

import json
from collections.abc import Callable

import gradio as gr

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.runs.live import describe, params_of, scores_text
from personalize.runs.recording import compare_runs
from personalize.sampling.samplers import SAMPLERS

from .controls import create_sampler_controls
from .errors import shown
from .gpu import gpu

START = ["concept", "mixed", "switching"]


def create_compare(lab: Lab, state: gr.State, compare: Callable = compare_runs, *, steps: int = 30,
                   prompt: str = "a photo of a {} on the beach") -> dict:
    """The Compare tab; `compare(lab, concept, history, prompt, samplers, params, seed, steps,
    size)` runs the comparison. Returns its components and `done`, the event a caller can
    chain on (the app refreshes the Explore tab there)."""
    with gr.Tab("Compare", id="compare"):
        gr.Markdown("The same prompt and seed through several samplers at once, each with its own sliders. "
                    "Each image shows its parameters, cost (denoiser rows, seconds) and scores.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                prompt_box = gr.Textbox(label="Prompt template", value=prompt, elem_id="compare-prompt")
                samplers = gr.CheckboxGroup(list(SAMPLERS), value=START, label="Samplers", elem_id="compare-samplers")
                groups, controls = {}, {}
                for name in SAMPLERS:
                    with gr.Group(visible=name in START, elem_id=f"compare-{name}") as group:
                        gr.Markdown(f"**{SAMPLERS[name].title}** sampling")
                        controls[name] = create_sampler_controls(name, steps, prefix="compare-")
                    groups[name] = group
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    steps_box = gr.Slider(1, 150, value=steps, step=1, label="Steps")
                    size = gr.Slider(64, 1024, value=lab.default_size, step=64, label="Image size")
                button = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Side by side", columns=3, height=420, elem_id="compare-gallery")
                with gr.Accordion("Run cards", open=False):
                    cards = gr.JSON(label="Run cards")

    names = list(SAMPLERS)
    flat = [c for name in names for c in controls[name]]

    def show(chosen):
        return [gr.update(visible=name in (chosen or [])) for name in names]
    samplers.change(show, [samplers], [groups[n] for n in names], queue=False, api_visibility="private")

    @gpu
    def run(session, prompt_, samplers_, seed_, steps_, size_, *values):
        params, k = {}, 0
        for name in names:
            n = len(controls[name])
            if name in (samplers_ or []):
                params[name] = params_of(name, list(values[k:k + n]))
            k += n
        try:
            _, run_cards = compare(lab, session.concept, session.history, prompt_, samplers_, json.dumps(params),
                                   seed_, steps_, size_)
        except UserError as e:
            raise shown(e) from None
        items = [(card["images"][0], f"{describe(card)}: {scores_text(card)}") for card in run_cards]
        return items, run_cards, session

    done = button.click(run, [state, prompt_box, samplers, seed, steps_box, size, *flat], [gallery, cards, state],
                        concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    return {"prompt": prompt_box, "samplers": samplers, "controls": controls, "seed": seed, "steps": steps_box,
            "size": size, "button": button, "gallery": gallery, "cards": cards, "done": done}
