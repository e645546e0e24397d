"""Compare: one prompt and seed through several samplers, side by side, with costs and scores."""

from __future__ import annotations

import json

import gradio as gr

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.sampling.samplers import SAMPLERS

from .explore import record_run, score
from .gpu import gpu
from .errors import shown


def parse_json_object(text: str, what: str) -> dict:
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: must be a JSON object, got {type(value).__name__}")
    return value


def parse_params(text: str, samplers: list[str]) -> dict:
    """The per-sampler parameters of a comparison: a JSON object {sampler: {param: value}}."""
    params = parse_json_object(text, "parameters")
    if not all(isinstance(v, dict) for v in params.values()):
        raise UserError('parameters: give a JSON object like {"mixed": {"w_s": 2}}')
    extra = sorted(set(params) - set(samplers))
    if extra:
        raise UserError(f"parameters: {extra[0]!r} is not one of the compared samplers ({', '.join(samplers)})")
    return params


def compare_runs(lab: Lab, session, prompt, samplers, params_text, seed, steps, size=None):
    """Run every sampler; returns (gallery items, cards). Raises UserError on bad input,
    before anything runs."""
    if isinstance(samplers, str):
        samplers = [samplers]
    if not samplers:
        raise UserError("compare: choose at least one sampler")
    params = parse_params(params_text, list(samplers))
    preps = [lab.request(session.concept, prompt, name, params.get(name, {}), seed=int(seed), steps=int(steps),
                         size=int(size) if size else None) for name in samplers]
    items, cards = [], []
    for name, prep in zip(samplers, preps):
        finished = lab.generate(prep)
        card, _ = record_run(lab, session, finished)
        cards.append(card)
        items.append((card["images"][0], f"{name}: {card['denoiser_rows']} rows, {card['seconds']:.1f} s, "
                                f"IS {score(card['is'])}, TS {score(card['ts'])}"))
    return items, cards


def create_compare(lab: Lab, state: gr.State, chart: gr.Plot):
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
            items, run_cards = compare_runs(lab, session, prompt_, samplers_, params_, seed_, steps_, size_)
        except UserError as e:
            raise shown(e) from None
        return items, run_cards, lab.chart(session.history, session.background), session

    button.click(run, [state, prompt, samplers, params, seed, steps, size], [gallery, cards, chart, state],
                 concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
