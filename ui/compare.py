"""Compare: one prompt and seed through several samplers, side by side, with costs and scores."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.runs.recording import compare_runs
from personalize.sampling.samplers import SAMPLERS

from .errors import shown
from .gpu import gpu


def create_compare(lab: Lab, state: gr.State, compare: Callable = compare_runs) -> dict:
    """The Compare tab; `compare(lab, concept, history, prompt, samplers, params, seed, steps,
    size)` runs the comparison. Returns its components and `done`, the event a caller can
    chain on (the app redraws the Explore chart there)."""
    with gr.Tab("Compare"):
        gr.Markdown("The same prompt and seed through several samplers at once. Each image shows its cost "
                    "(denoiser rows, seconds) and scores; every run also lands on the Explore tab's chart.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt template", value="a photo of a {} on the beach")
                samplers = gr.CheckboxGroup(list(SAMPLERS), value=["concept", "mixed", "switching"],
                                            label="Samplers")
                params = gr.Textbox(label="Parameters per sampler (JSON, optional)",
                                    placeholder='{"mixed": {"w_s": 2.0, "w_c": 5.0}}')
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    steps = gr.Slider(1, 150, value=30, step=1, label="Steps")
                    size = gr.Slider(64, 1024, value=lab.default_size, step=64, label="Image size")
                button = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column():
                gallery = gr.Gallery(label="Side by side", columns=3, height=420, elem_id="compare-gallery")
                cards = gr.JSON(label="Run cards")

    @gpu
    def run(session, prompt_, samplers_, params_, seed_, steps_, size_):
        try:
            items, run_cards = compare(lab, session.concept, session.history, prompt_, samplers_, params_,
                                       seed_, steps_, size_)
        except UserError as e:
            raise shown(e) from None
        return items, run_cards, session

    done = button.click(run, [state, prompt, samplers, params, seed, steps, size], [gallery, cards, state],
                        concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    return {"prompt": prompt, "samplers": samplers, "params": params, "seed": seed, "steps": steps, "size": size,
            "button": button, "gallery": gallery, "cards": cards, "done": done}
