"""personalize: explore the samplers of personalized text-to-image generation.

`python app.py` serves the app locally (and as a Hugging Face Space: see README front
matter); with no `--model` it uses the study's base model where it can be had, else the
offline demo model, and says so on the page.
"""

from __future__ import annotations

import argparse
import copy
import sys

import gradio as gr
import torch

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.runs.live import Live
from personalize.runs.live import make_lab as live_lab
from personalize.runs.threads import use_serving_threads
from ui import gpu
from ui.api import create_api
from ui.compare import create_compare
from ui.concept_tab import create_concept
from ui.explore import create_explore
from ui.guide import create_guide
from ui.serving import (
    blocks_settings,
    launch_settings,
    queue_settings,
    start_cleaner,
    study_storage_warning,
    trust_proxy,
)
from ui.session import Session
from ui.train_tab import create_train

# Page styles (pass to `launch(css=CSS)`): compact text beside the images; small images
# stay sharp when shown large; the study's three images at one display size.
CSS = """
.banner, .score { font-size: 0.85em; }
.score p { margin: 0; }
#img-concept img, #img-chosen img, #img-superclass img, #sweep-gallery img { image-rendering: pixelated; }
#study-reference img, #study-image-1 img, #study-image-2 img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""
WORLD_STEPS = 25  # the world's own step count (personalize.world.check)


def build_app(lab: Lab, study_dir=None) -> gr.Blocks:
    """The app; with `study_dir`, also that user study's tab (first) and endpoints."""
    study = None
    if study_dir is not None:
        from personalize.study.tasks import Study
        study = Study(study_dir)
    live = Live(lab)
    start = {"steps": WORLD_STEPS, "prompt": "a {} on the beach"} if live.world else {}
    with gr.Blocks(title="personalize: sampling for personalized text-to-image", **blocks_settings()) as demo:
        gr.Markdown("**personalize** · which sampler gives your fine-tuned concept the best balance of concept "
                    "fidelity and prompt following?")
        if study is not None and (warning := study_storage_warning(study)):
            gr.Markdown(warning, elem_id="study-storage-warning")
        state = gr.State(Session(copy.deepcopy(lab.default_concept)))
        with gr.Tabs():
            if study is not None:
                from ui.study_tab import create_study
                create_study(study)
            explore = create_explore(lab, state, live, **start)
            compare = create_compare(lab, state, **start)
            concept = create_concept(lab, state)
            train = create_train(lab, state)
            create_guide()
        create_api(lab, state)
        # The tabs know nothing of each other; the app wires what one shows after another acts.
        refresh = [state, explore["live_state"]]
        compare["done"].then(explore["refresh"], refresh, explore["refresh_outputs"], api_visibility="private")
        concept["done"].then(explore["refresh"], refresh, explore["refresh_outputs"], api_visibility="private")
        train["done"].then(explore["refresh"], refresh, explore["refresh_outputs"], api_visibility="private")
        demo.load(explore["refresh"], refresh, explore["refresh_outputs"], api_visibility="private")
    # One queue for everything that touches the model: users never share a pipeline mid-run.
    demo.queue(**queue_settings())
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base pipeline folder or hub id (default: see above)")
    p.add_argument("--concept", default=None, help="fine-tuned concept, any supported format")
    p.add_argument("--concept-phrase", default=None)
    p.add_argument("--superclass", default=None)
    p.add_argument("--device", default=None, help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", default=None, help="default: float16 on cuda, else float32")
    p.add_argument("--host", default=None, help="default: 127.0.0.1, or GRADIO_SERVER_NAME (Spaces)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")
    p.add_argument("--study", default=None, metavar="STUDY_DIR", help="also serve this pairwise user study "
                   "(`python -m personalize study build/demo`); its report needs PERSONALIZE_ADMIN_PASSWORD")
    p.add_argument("--concepts-dir", default=None, help="folder whose concepts the Concept tab's path box may "
                   "name (default: only --concept); anything else must be uploaded")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        lab = make_lab(args)
        demo = build_app(lab, study_dir=args.study)
        prepare_serving(lab)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    start_cleaner()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                **launch_settings(lab, args.study))


def prepare_serving(lab: Lab, *, zero_gpu: bool | None = None) -> None:
    """Before serving: rates count per visitor behind a Space's proxy, torch's CPU threads
    are set for a server's many calling threads (`personalize.runs.threads`), and on
    ZeroGPU the pipeline is loaded now, outside the forked GPU workers."""
    trust_proxy()
    use_serving_threads(lab.device)
    if gpu.ZERO_GPU if zero_gpu is None else zero_gpu:
        lab.preload()


def make_lab(args) -> Lab:
    """The app's Lab from the command line (`personalize.runs.live.make_lab`): the device
    is cuda (float16) where a GPU is present, else cpu."""

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    return live_lab(args.model, concept=args.concept, concept_phrase=args.concept_phrase,
                    superclass=args.superclass, device=device, dtype=dtype, concepts_dir=args.concepts_dir)


if __name__ == "__main__":
    main()
