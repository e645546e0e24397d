"""The web API endpoints `/generate` and `/compare` (docs/interfaces.md), on hidden
components so that their signatures are exactly the documented ones."""

from __future__ import annotations

import gradio as gr

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.runs.recording import compare_runs, parse_json_object, record_run
from personalize.sampling.samplers import SAMPLERS

from .errors import shown
from .gpu import gpu
from .serving import RateLimit


def create_api(lab: Lab, state: gr.State, rate: RateLimit | None = None):
    """The endpoints; `rate` (default: PERSONALIZE_RUNS_PER_MINUTE per client) is checked
    before anything else."""
    rate = rate or RateLimit()
    with gr.Column(visible=False):
        prompt = gr.Textbox(label="prompt template")
        sampler = gr.Textbox(label="sampler name")
        params = gr.Textbox(label="parameters (JSON object)")
        # precision=None: the value comes through as sent, and the library's check says what
        # is wrong with 1e400, NaN or 2**64 (gradio's own rounding would fail without a message)
        seed = gr.Number(value=0, precision=None, label="seed")
        steps = gr.Number(value=30, precision=None, label="steps")
        samplers = gr.Dropdown(list(SAMPLERS), multiselect=True, label="sampler names")
        images = gr.Gallery(label="images")
        card = gr.JSON(label="run card")
        button_generate = gr.Button()
        button_compare = gr.Button()

    @gpu
    def generate(session, prompt_, sampler_, params_, seed_, steps_, request: gr.Request = None):
        """One run of one sampler; returns its images and run card (with is, ts, ts_class)."""
        try:
            rate.check(request)
            prep = lab.request(session.concept, prompt_, sampler_, parse_json_object(params_, "parameters"),
                               seed=seed_, steps=steps_)
            finished = lab.generate(prep)
        except UserError as e:
            raise shown(e) from None
        run_card, _ = record_run(lab, session.concept, session.history, finished)
        return run_card["images"], run_card, session

    @gpu
    def compare(session, prompt_, samplers_, params_, seed_, steps_, request: gr.Request = None):
        """The same prompt and seed through several samplers: one image per sampler, run cards."""
        try:
            rate.check(request)
            items, cards = compare_runs(lab, session.concept, session.history, prompt_, samplers_, params_, seed_, steps_)
        except UserError as e:
            raise shown(e) from None
        return items, cards, session

    button_generate.click(generate, [state, prompt, sampler, params, seed, steps], [images, card, state],
                          api_name="generate", concurrency_id="gpu", concurrency_limit=1)
    button_compare.click(compare, [state, prompt, samplers, params, seed, steps], [images, card, state],
                         api_name="compare", concurrency_id="gpu", concurrency_limit=1)
