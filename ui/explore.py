"""Explore: one sampler, its sliders, a streamed run, the session's chart and history."""

from __future__ import annotations

import json
import random

import gradio as gr

from personalize.sampling.engine import Stopped
from personalize.errors import UserError
from personalize.runs.lab import Finished, Lab
from personalize.evaluation.prompt_sets import DREAMBENCH_LIVE, DREAMBENCH_OBJECT
from personalize.runs.recording import PARAM_NAMES, format_score, params_from, record_run
from personalize.sampling.samplers import SAMPLERS

from .controls import control_updates, create_controls
from .gpu import gpu
from .errors import shown

HISTORY_HEADERS = ["#", "sampler", "params", "seed", "steps", "IS", "TS", "TS class", "rows", "seconds"]


def history_rows(history: list) -> list[list]:
    def fmt(v):
        return None if v is None else round(float(v), 4)
    return [[k + 1, c["sampler"], json.dumps(c["params"]), c["seed"], c["steps"], fmt(c.get("is")),
             fmt(c.get("ts")), fmt(c.get("ts_class")), c["denoiser_rows"], c["seconds"]]
            for k, c in enumerate(history)]


def create_explore(lab: Lab, state: gr.State):
    start_sampler, start_steps = "mixed", 30
    with gr.Tab("Explore"):
        gr.Markdown(lab.banner(), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt template", value="a photo of a {} on the beach",
                                    info="{}, V* or <V*> marks where the concept phrase goes", elem_id="prompt")
                gr.Examples([[p] for p in DREAMBENCH_OBJECT[:10] + DREAMBENCH_LIVE[10:20]], inputs=[prompt],
                            label="Benchmark prompts")
                sampler = gr.Dropdown(list(SAMPLERS), value=start_sampler, label="Sampler", elem_id="sampler")
                controls = create_controls(start_sampler, start_steps)
                with gr.Accordion("Run settings", open=False):
                    steps = gr.Slider(1, 150, value=start_steps, step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        randomize = gr.Checkbox(value=False, label="Randomize seed")
                    negative = gr.Textbox(value="", label="Negative prompt")
                    size = gr.Slider(64, 1024, value=lab.default_size, step=64, label="Image size", elem_id="size")
                    num_images = gr.Slider(1, 8, value=1, step=1, label="Images per run")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=2, height=360, elem_id="gallery")
                with gr.Row():
                    attention = gr.Image(label="Attention map (masked)", elem_id="attention", height=180)
                    mask = gr.Image(label="Mask (masked)", elem_id="mask", height=180)
                status = gr.Markdown(elem_id="status")
                card_json = gr.JSON(label="Run card")
                card_file = gr.File(label="Download run card")
        with gr.Row():
            chart = gr.Plot(label="IS / TS of this session's runs", elem_id="chart")
            with gr.Column():
                references = gr.Gallery(label="Concept reference images", columns=3, height=200,
                                        elem_id="references")
                ref_upload = gr.File(label="Replace reference images", file_count="multiple",
                                     file_types=["image"])
                csv_upload = gr.File(label="Sweep results.csv as background curves", file_types=[".csv"])
        with gr.Accordion("History", open=True):
            history = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, elem_id="history")
            with gr.Row():
                pick = gr.Number(value=1, precision=0, label="Run #", minimum=1)
                reload_btn = gr.Button("Load run into the sliders")

    control_list = [controls[n] for n in PARAM_NAMES]

    # `input`, not `change`: reloading a run from the history sets the sampler without resetting its sliders
    sampler.input(lambda s, n: control_updates(s, int(n)), [sampler, steps], control_list, queue=False)

    def draw_seed(current, shuffle):
        return random.randrange(2 ** 31) if shuffle else current

    @gpu
    def run(session, prompt_, sampler_, negative_, steps_, seed_, size_, n_, *values,
            progress=gr.Progress()):
        session.stop.clear()
        try:
            prep = lab.request(session.concept, prompt_, sampler_, params_from(sampler_, values),
                               seed=int(seed_), steps=int(steps_), negative_prompt=negative_,
                               size=int(size_), num_images=int(n_))
            for item in lab.stream(prep, session.stop):
                if isinstance(item, Finished):
                    card, card_path = record_run(lab, session.concept, session.history, item)
                    yield {gallery: card["images"], card_json: card, card_file: card_path,
                           chart: lab.chart(session.history, session.background),
                           history: history_rows(session.history),
                           status: f"Done: {card['denoiser_rows']} denoiser rows in {card['seconds']:.1f} s. "
                                   f"IS {format_score(card['is'])}, TS {format_score(card['ts'])}"
                                   + (" (random-weight metric models)" if card.get("metrics_random") else ""),
                           state: session}
                else:
                    progress((item.step + 1, item.steps), desc="denoising")
                    out = {gallery: item.previews, status: f"Step {item.step + 1} of {item.steps}"}
                    if item.attention is not None:
                        out[attention] = item.attention[0]
                        out[mask] = item.mask[0]
                    yield out
        except Stopped as e:
            yield {status: f"Stopped ({e}); the device is free."}
        except UserError as e:
            raise shown(e) from None

    inputs = [state, prompt, sampler, negative, steps, seed, size, num_images, *control_list]
    outputs = [gallery, attention, mask, status, card_json, card_file, chart, history, state]
    run_btn.click(draw_seed, [seed, randomize], [seed], queue=False).then(
        run, inputs, outputs, concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def stop(session):
        # The run checks this event at every step, ends, and says so in the status line.
        session.stop.set()
    stop_btn.click(stop, [state], None, queue=False, api_visibility="private")

    def replace_references(session, files):
        try:
            session.concept.references = lab.check_references(list(files or []))
        except UserError as e:
            raise shown(e) from None
        return session.concept.references, session
    ref_upload.upload(replace_references, [state, ref_upload], [references, state], api_visibility="private")

    def load_background(session, path):
        try:
            session.background = lab.read_results(path) if path else []
        except UserError as e:
            raise shown(e) from None
        return lab.chart(session.history, session.background), session
    csv_upload.change(load_background, [state, csv_upload], [chart, state], api_visibility="private")

    def reload(session, k):
        k = int(k or 0)
        if not 1 <= k <= len(session.history):
            raise gr.Error(f"Run #{k} is not in this session's history (1 to {len(session.history)})",
                           print_exception=False)
        card = session.history[k - 1]
        updates = control_updates(card["sampler"], card["steps"])
        for i, name in enumerate(PARAM_NAMES):
            if name in card["params"] and not isinstance(card["params"][name], list):
                updates[i] = gr.update(visible=True, value=card["params"][name])
        return [card["prompt_template"], card["sampler"], card["seed"], card["steps"], card["prompts"]["negative"],
                *updates]
    reload_btn.click(reload, [state, pick], [prompt, sampler, seed, steps, negative, *control_list],
                     queue=False, api_visibility="private")

    return {"prompt": prompt, "sampler": sampler, "controls": controls, "gallery": gallery, "status": status,
            "references": references, "chart": chart, "history": history}
