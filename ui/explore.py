"""Explore: one sampler between its two ends, live.

Left, the sampler's sliders; right, at the same seed, concept sampling | the chosen
sampler | superclass sampling, each with its scores, and under them this session's IS/TS
chart. Releasing a slider re-runs the chosen sampler only (the two ends are cached per
prompt and seed); a newer change supersedes a run still going, which stops at its next
step. The run card, downloads, references and history fold away below.
"""

from __future__ import annotations

import json
import random
import time

import gradio as gr

from personalize.errors import UserError
from personalize.evaluation.prompt_sets import DREAMBENCH_LIVE, DREAMBENCH_OBJECT
from personalize.runs.lab import Lab
from personalize.runs.live import Live, LiveState, Shot, chart, describe, overlay, scores_text
from personalize.runs.recording import PARAM_NAMES, params_from
from personalize.sampling.engine import Stopped
from personalize.sampling.samplers import SAMPLERS

from .controls import control_updates, create_controls
from .errors import shown
from .gpu import gpu

HISTORY_HEADERS = ["#", "sampler", "params", "seed", "steps", "IS", "TS", "TS class", "rows", "seconds"]
PREVIEW_EVERY = 0.25   # seconds between streamed previews of a run still going
# A run's first preview comes after this many seconds: a run that ends sooner (a world
# image) shows only its result. Sending previews, and the two ends again, on every slider
# change took CPU from the run: on the world in Chromium, slider release to image took
# 1.25-1.33 s median without them against 1.41-1.76 s with (3 x 20 changes each, interleaved).
PREVIEW_AFTER = 1.0
IMAGE_HEIGHT = 190
WORLD_PROMPTS = ["a {} on the beach", "a {} in the snow", "a {} in the jungle", "a {} on a cobblestone street",
                 "a red {}", "a blue {}"]


def history_rows(history: list) -> list[list]:
    def fmt(v):
        return None if v is None else round(float(v), 4)
    return [[k + 1, c["sampler"], json.dumps(c["params"]), c["seed"], c["steps"], fmt(c.get("is")),
             fmt(c.get("ts")), fmt(c.get("ts_class")), c["denoiser_rows"], c["seconds"]]
            for k, c in enumerate(history)]


def sweepable(sampler: str) -> list[str]:
    return [p.name for p in SAMPLERS[sampler].params]


def create_explore(lab: Lab, state: gr.State, live: Live | None = None, *, steps: int = 30,
                   prompt: str = "a photo of a {} on the beach"):
    """The Explore tab. `live` runs and scores (one per app); `steps` and `prompt` are where
    the sliders start (a world starts at its own prompts and fewer steps)."""
    live = live or Live(lab)
    start_sampler = "mixed"
    with gr.Tab("Explore", id="explore"):
        # inside the tab: a child of gr.Tabs that is not a tab shifts every tab after it
        # (the Compare tab rendered as a second Explore)
        live_state = gr.State(LiveState())
        gr.Markdown(lab.banner(), elem_id="banner", elem_classes=["banner"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                prompt_box = gr.Textbox(label="Prompt template", value=prompt, lines=1, max_lines=1,
                                        info="{} marks the concept; Enter runs", elem_id="prompt")
                sampler = gr.Dropdown(list(SAMPLERS), value=start_sampler, label="Sampler", elem_id="sampler")
                controls = create_controls(start_sampler, steps)
                show_mask = gr.Checkbox(value=False, label="Show the cross-attention mask over the chosen image "
                                        "(masked sampling)", elem_id="mask-toggle")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="seed", min_width=80)
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate", min_width=80)
                with gr.Accordion("Sweep this parameter", open=False, elem_id="sweep-box"):
                    sweep_param = gr.Dropdown(sweepable(start_sampler), value="w_s", label="Parameter to sweep",
                                              elem_id="sweep-param")
                    sweep_points = gr.Slider(2, 16, value=8, step=1, label="Sweep points", elem_id="sweep-points")
                    sweep_btn = gr.Button("Sweep this parameter", elem_id="sweep")
                with gr.Accordion("Run settings", open=False):
                    steps_box = gr.Slider(1, 150, value=steps, step=1, label="Steps", elem_id="steps")
                    randomize = gr.Checkbox(value=False, label="Randomize seed on Generate")
                    negative = gr.Textbox(value="", label="Negative prompt", elem_id="negative")
                    size = gr.Slider(64, 1024, value=lab.default_size, step=64, label="Image size", elem_id="size")
                    num_images = gr.Slider(1, 8, value=1, step=1, label="Images per run")
                    stop_btn = gr.Button("Stop the run", variant="stop", elem_id="stop")
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    with gr.Column(min_width=160):
                        img_concept = gr.Image(label="Concept sampling", height=IMAGE_HEIGHT, interactive=False,
                                               elem_id="img-concept", buttons=["download"])
                        score_concept = gr.Markdown(elem_id="score-concept", elem_classes=["score"])
                    with gr.Column(min_width=160):
                        img_chosen = gr.Image(label="Chosen sampler", height=IMAGE_HEIGHT, interactive=False,
                                              elem_id="img-chosen", buttons=["download"])
                        score_chosen = gr.Markdown(elem_id="score-chosen", elem_classes=["score"])
                    with gr.Column(min_width=160):
                        img_superclass = gr.Image(label="Superclass sampling", height=IMAGE_HEIGHT,
                                                  interactive=False, elem_id="img-superclass", buttons=["download"])
                        score_superclass = gr.Markdown(elem_id="score-superclass", elem_classes=["score"])
                status = gr.Markdown("Release a slider to run.", elem_id="status", elem_classes=["score"])
                plot = gr.Plot(label="IS / TS of this session's runs", show_label=False, elem_id="chart")
        with gr.Accordion("Run card and downloads", open=False, elem_id="card-box"):
            with gr.Row():
                gallery = gr.Gallery(label="All images of the last run", columns=4, height=220, elem_id="gallery")
                sweep_gallery = gr.Gallery(label="Sweep images", columns=8, height=220, elem_id="sweep-gallery")
            card_json = gr.JSON(label="Run card")
            card_file = gr.File(label="Download run card (run.json)", elem_id="card-file")
        with gr.Accordion("History", open=False, elem_id="history-box"):
            history = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, elem_id="history",
                                   label="This session's runs")
            with gr.Row():
                pick = gr.Number(value=1, precision=0, label="Run #", minimum=1)
                reload_btn = gr.Button("Load run into the sliders", elem_id="reload")
        with gr.Accordion("Concept references and background curves", open=False):
            with gr.Row():
                references = gr.Gallery(label="Concept reference images", columns=5, height=160,
                                        elem_id="references")
                with gr.Column():
                    ref_upload = gr.File(label="Replace reference images", file_count="multiple",
                                         file_types=["image"])
                    csv_upload = gr.File(label="Sweep results.csv as background curves", file_types=[".csv"])
        gr.Examples([[p] for p in WORLD_PROMPTS] if live.world else
                    [[p] for p in DREAMBENCH_OBJECT[:10] + DREAMBENCH_LIVE[10:20]], inputs=[prompt_box],
                    label="Prompts")

    control_list = [controls[n] for n in PARAM_NAMES]
    settings = [prompt_box, sampler, seed, steps_box, negative, size, num_images, show_mask]
    images = [img_concept, img_chosen, img_superclass]
    scores = [score_concept, score_chosen, score_superclass]

    def picture(shot: Shot, role: str, mask: bool = False):
        """An image component update: the shot at display size, alt text naming it."""
        shown_mask = mask and shot.mask is not None
        image = overlay(shot.image, shot.mask) if shown_mask else shot.image
        prompt = shot.card["prompts"]["superclass" if shot.sampler == "superclass" else "concept"]
        alt = (f"{role}: {describe(shot)}, seed {shot.card['seed']}, {shot.card['steps']} steps, prompt "
               f"'{prompt}'" + (", cross-attention mask in red" if shown_mask else ""))
        return gr.Image(value=live.shown(image), alt_text=alt)

    def ends_update(ends: tuple[Shot, Shot]) -> dict:
        concept_shot, superclass_shot = ends
        return {img_concept: picture(concept_shot, "Concept sampling"), score_concept: scores_text(concept_shot),
                img_superclass: picture(superclass_shot, "Superclass sampling"),
                score_superclass: scores_text(superclass_shot)}

    def supersede(ls: LiveState):
        # Unqueued: it reaches the server while a run is going, which then stops at its next step.
        ls.new_request()

    @gpu
    def run_live(session, ls: LiveState, prompt_, sampler_, seed_, steps_, negative_, size_, n_, mask_, *values):
        stop = ls.stop_for(ls.new_request())
        try:
            prep = live.request(session.concept, prompt_, sampler_, params_from(sampler_, values), seed=seed_,
                                steps=steps_, size=size_, negative_prompt=negative_, num_images=n_)
            ends = live.ends(ls, session.concept, prompt_, seed=seed_, steps=steps_, size=size_,
                             negative_prompt=negative_)
            # `Live.ends` hands back its cached tuple while prompt, seed and concept stay, and a
            # session's gr.State is one object across events: identity says the page has them
            if ends is not ls.ends_shown:
                ls.ends_shown = ends
                yield {**ends_update(ends), plot: chart(ls, session.background)}
            next_preview = time.perf_counter() + PREVIEW_AFTER
            for item in live.stream(session.concept, prep, stop):
                if isinstance(item, Shot):
                    ls.shots.append(item)
                    ls.finished += 1
                    card_path = live.record(item, session.history)
                    yield {img_chosen: picture(item, "Chosen sampler", mask_), score_chosen: scores_text(item),
                           plot: chart(ls, session.background), gallery: item.card["images"],
                           card_json: item.card, card_file: card_path, history: history_rows(session.history),
                           status: f"Done: {describe(item)}. Runs finished: {ls.finished}, "
                                   f"superseded by a newer change: {ls.superseded}."}
                elif time.perf_counter() >= next_preview:
                    next_preview = time.perf_counter() + PREVIEW_EVERY
                    preview = item.previews[0]
                    if mask_ and item.mask is not None:
                        preview = overlay(preview, item.mask[0])
                    yield {img_chosen: gr.Image(value=live.shown(preview), alt_text=f"Chosen sampler: {sampler_} sampling, "
                                                f"preview at step {item.step + 1} of {item.steps}"),
                           status: f"Step {item.step + 1} of {item.steps}"}
        except Stopped:
            ls.superseded += 1
            print(f"live: a {sampler_} run was superseded by a newer change ({ls.superseded} so far)", flush=True)
            out = {status: f"Superseded by a newer change. Runs finished: {ls.finished}, superseded: {ls.superseded}."}
            if ls.shots:  # not a half-made preview: the last finished image
                out[img_chosen] = picture(ls.shots[-1], "Chosen sampler", mask_)
            yield out
        except UserError as e:
            raise shown(e) from None

    run_inputs = [state, live_state, *settings[:-1], show_mask, *control_list]
    run_outputs = [*images, *scores, plot, gallery, card_json, card_file, history, status]

    def live_run(dependency):
        """Chain a live run after `dependency` (a supersede): deferred, never queued twice."""
        return dependency.then(run_live, run_inputs, run_outputs, trigger_mode="always_last", concurrency_id="gpu",
                               concurrency_limit=1, show_progress="hidden", api_visibility="private")

    def on(trigger):
        return live_run(trigger(supersede, [live_state], None, queue=False, trigger_mode="multiple",
                                show_progress="hidden", api_visibility="private"))

    for control in control_list:
        on(control.input if isinstance(control, gr.Radio) else control.release)
    on(steps_box.release)
    on(prompt_box.submit)
    on(seed.submit)

    def draw_seed(current, shuffle):
        return random.randrange(2 ** 31) if shuffle else current
    live_run(run_btn.click(draw_seed, [seed, randomize], [seed], queue=False, api_visibility="private")
             .then(supersede, [live_state], None, queue=False, api_visibility="private"))

    # `input`, not `change`: reloading a run from the history sets the sampler without resetting its sliders
    def choose(sampler_, steps_, swept):
        names = sweepable(sampler_)
        return [*control_updates(sampler_, int(steps_)),
                gr.update(choices=names, value=swept if swept in names else names[0])]
    live_run(sampler.input(choose, [sampler, steps_box, sweep_param], [*control_list, sweep_param], queue=False,
                           api_visibility="private")
             .then(supersede, [live_state], None, queue=False, api_visibility="private"))

    def toggle_mask(ls: LiveState, mask_):
        if not ls.shots:
            return gr.update()
        return picture(ls.shots[-1], "Chosen sampler", mask_)
    show_mask.change(toggle_mask, [live_state, show_mask], [img_chosen], queue=False, api_visibility="private")

    def stop(ls: LiveState):
        ls.new_request()  # the run going is superseded by nothing: it stops at its next step
    stop_btn.click(stop, [live_state], None, queue=False, api_visibility="private")

    @gpu
    def run_sweep(session, ls: LiveState, prompt_, sampler_, seed_, steps_, negative_, size_, name, points, *values):
        ls.new_request()
        try:
            params = params_from(sampler_, values)
            if name not in params:
                raise UserError(f"sweep: {sampler_} sampling has no parameter {name!r}")
            prep = live.request(session.concept, prompt_, sampler_, params, seed=seed_, steps=steps_, size=size_,
                                negative_prompt=negative_)
            started = time.perf_counter()
            ends = live.ends(ls, session.concept, prompt_, seed=seed_, steps=steps_, size=size_,
                             negative_prompt=negative_)
            shots = live.sweep(ls, session.concept, prep, name, int(points))
        except UserError as e:
            raise shown(e) from None
        values_ = [s.params[name] for s in shots]
        ls.ends_shown = ends
        return {**ends_update(ends), plot: chart(ls, session.background),
                sweep_gallery: [(live.shown(s.image), f"{name}={v}: {scores_text(s)}") for s, v in zip(shots, values_)],
                status: f"Sweep of {name} over {len(shots)} points ({values_[0]} to {values_[-1]}) in "
                        f"{time.perf_counter() - started:.1f} s."}
    sweep_btn.click(supersede, [live_state], None, queue=False, api_visibility="private").then(
        run_sweep, [state, live_state, *settings[:-2], sweep_param, sweep_points, *control_list],
        [*images, *scores, plot, sweep_gallery, status], concurrency_id="gpu", concurrency_limit=1,
        api_visibility="private")

    def replace_references(session, ls: LiveState, files):
        try:
            session.concept.references = lab.check_references(list(files or []))
        except UserError as e:
            raise shown(e) from None
        ls.ends.clear()  # their IS changes with the references
        return session.concept.references
    ref_upload.upload(replace_references, [state, live_state, ref_upload], [references], api_visibility="private")

    def load_background(session, ls: LiveState, path):
        try:
            session.background = lab.read_results(path) if path else []
        except UserError as e:
            raise shown(e) from None
        return chart(ls, session.background)
    csv_upload.change(load_background, [state, live_state, csv_upload], [plot], api_visibility="private")

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
        names = sweepable(card["sampler"])
        return [card["prompt_template"], card["sampler"], card["seed"], card["steps"], card["prompts"]["negative"],
                gr.update(choices=names, value=names[0]), *updates]
    live_run(reload_btn.click(reload, [state, pick], [prompt_box, sampler, seed, steps_box, negative, sweep_param,
                                                      *control_list], queue=False, api_visibility="private")
             .then(supersede, [live_state], None, queue=False, api_visibility="private"))

    def refresh(session, ls: LiveState):
        """What the tab shows on load and after another tab ran something."""
        return session.concept.references, chart(ls, session.background), history_rows(session.history)

    return {"prompt": prompt_box, "sampler": sampler, "controls": controls, "gallery": gallery, "status": status,
            "references": references, "chart": plot, "history": history, "images": images, "live_state": live_state,
            "refresh": refresh, "refresh_outputs": [references, plot, history]}
