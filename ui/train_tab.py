"""Train: a concept from 3 to 20 photos (SVDiff, DreamBooth, LoRA or textual inversion)
that becomes this user's concept when the run ends."""

from __future__ import annotations

import math
from collections.abc import Iterator

import gradio as gr

from personalize.errors import UserError
from personalize.models.loading import load_pipeline
from personalize.runs.lab import Concept, Lab
from personalize.runs.request import use_concept
from personalize.training import METHODS, recipe
from personalize.training.jobs import (
    MAX_PHOTO_MB,
    MAX_PHOTOS,
    MAX_STEPS,
    MIN_PHOTOS,
    Progress,
    Trained,
    check_request,
    stream_training,
)

from .errors import shown
from .gpu import gpu
from .session import Session

START_METHOD = "svdiff"
START_STEPS = 200


def describe(method: str) -> str:
    """One line on the method's recipe."""
    rec = recipe(method)
    token = (" The phrase is the one new token it learns, such as `<sks>`."
             if rec.method == "textual-inversion" else "")
    return f"**{rec.method}**: lr {rec.lr:g}, recipe {rec.steps} steps ({rec.source}).{token}"


def progress_line(p: Progress) -> str:
    eta = f", about {p.eta_s:.0f} s left" if math.isfinite(p.eta_s) else ""
    return f"Step {p.step} of {p.steps}: loss {p.loss:.4f}, {p.steps_per_s:.2f} steps/s{eta}"


def train(lab: Lab, session: Session, photos, phrase, superclass, method, steps, *,
          resolution: int | None = None, root=None) -> Iterator[Progress | Trained]:
    """Check the request, train on the app's model and, when the run ends (finished or
    stopped), make the trained folder this session's concept. Yields what the library
    yields; raises UserError on bad input."""
    request = check_request(photos, phrase, superclass, method, steps)
    stop = session.training.stop_for(session.training.new_request())
    pipe = load_pipeline(lab.model, device=lab.device, dtype=lab.dtype, scheduler=lab.scheduler)
    use_concept(pipe, None, "", 1.0)   # train on the base model, not on the concept an earlier run applied
    for item in stream_training(pipe, request, stop, root=root, resolution=resolution,
                                base_model=lab.model):
        if isinstance(item, Trained):
            # The server wrote this folder for this user: it is used as it is (a path typed in the
            # Concept tab must be one the server offers; this one is not offered to anyone else).
            session.concept = Concept(request.phrase, request.superclass, lab.check_references(item.references),
                                      str(item.out))
        yield item


def request_stop(session: Session) -> None:
    """The Stop button: the run going is superseded; it checks after every step, saves a
    checkpoint and writes the concept so far."""
    session.training.new_request()


def finished_line(t: Trained) -> str:
    s = t.summary
    state = "Stopped after" if s["stopped"] else "Trained"
    return (f"{state} {s['steps']} of {s['steps_planned']} steps in {s['seconds']:.1f} s; probe loss "
            f"{s['probe_loss_start']:.4f} → {s['probe_loss_end']:.4f}. **{s['phrase']}** is now your concept "
            f"(weights `{t.out}`); the next Explore run uses it.")


def create_train(lab: Lab, state: gr.State) -> dict:
    """The Train tab. Returns its components and `done`, the event after a run ends (the
    app refreshes the Explore tab's references and the Concept tab's fields there)."""
    with gr.Tab("Train"):
        gr.Markdown(f"Train a concept from {MIN_PHOTOS} to {MAX_PHOTOS} photos of one subject (at most "
                    f"{MAX_PHOTO_MB} MB each) on this app's model. When the run ends, or you stop it, the "
                    "concept becomes your concept for every run of your session.")
        photos = gr.File(label="Photos of the concept", file_count="multiple", file_types=["image"],
                         elem_id="train-photos")
        with gr.Row():
            phrase = gr.Textbox(value="sks star", label="Concept phrase", elem_id="train-phrase",
                                info="a rare phrase (textual inversion: one new token such as <sks>)")
            superclass = gr.Textbox(value="star", label="Superclass", elem_id="train-superclass")
        with gr.Row():
            method = gr.Dropdown(list(METHODS), value=START_METHOD, label="Method", elem_id="train-method")
            steps = gr.Slider(1, MAX_STEPS, value=START_STEPS, step=1, label="Steps", elem_id="train-steps")
        recipe_line = gr.Markdown(describe(START_METHOD))
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary", elem_id="train")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
        status = gr.Markdown(elem_id="train-status")
        folder = gr.Textbox(label="Trained concept folder (loads with --concept)", interactive=False,
                            elem_id="train-folder")

    method.change(describe, [method], [recipe_line], queue=False, api_visibility="private")

    @gpu
    def run(session, photos_, phrase_, superclass_, method_, steps_, progress=gr.Progress()):
        try:
            for item in train(lab, session, photos_, phrase_, superclass_, method_, steps_):
                if isinstance(item, Trained):
                    yield finished_line(item), str(item.out), session
                else:
                    progress((item.step, item.steps), desc="training")
                    yield progress_line(item), gr.skip(), gr.skip()
        except UserError as e:
            raise shown(e) from None

    done = train_btn.click(run, [state, photos, phrase, superclass, method, steps], [status, folder, state],
                           concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    stop_btn.click(request_stop, [state], None, queue=False, api_visibility="private")
    return {"photos": photos, "phrase": phrase, "superclass": superclass, "method": method, "steps": steps,
            "train": train_btn, "stop": stop_btn, "status": status, "folder": folder, "done": done}
