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

from personalize.errors import UserError
from personalize.runs.lab import Lab
from ui.api import create_api
from ui.compare import create_compare
from ui.concept_tab import create_concept
from ui.explore import create_explore
from ui.guide import create_guide
from ui.session import Session


def build_app(lab: Lab, study_dir=None) -> gr.Blocks:
    """The app; with `study_dir`, also that user study's tab (first) and endpoints."""
    study = None
    if study_dir is not None:
        from personalize.study.tasks import Study
        study = Study(study_dir)
    with gr.Blocks(title="personalize: sampling for personalized text-to-image") as demo:
        gr.Markdown("# personalize\nWhich sampler gives your fine-tuned concept the best balance of concept "
                    "fidelity and prompt following?")
        state = gr.State(Session(copy.deepcopy(lab.default_concept)))
        with gr.Tabs():
            if study is not None:
                from ui.study_tab import create_study
                create_study(study)
            explore = create_explore(lab, state)
            compare = create_compare(lab, state)
            concept = create_concept(lab, state)
            create_guide()
        create_api(lab, state)
        # The tabs know nothing of each other; the app wires what one shows after another acts.
        compare["done"].then(lambda session: lab.chart(session.history, session.background), [state],
                             [explore["chart"]], api_visibility="private")
        concept["done"].then(lambda session: session.concept.references, [state], [explore["references"]],
                             api_visibility="private")
        demo.load(lambda session: (session.concept.references, lab.chart(session.history, session.background)),
                  [state], [explore["references"], explore["chart"]], api_visibility="private")
    # One queue for everything that touches the model: users never share a pipeline mid-run.
    demo.queue(default_concurrency_limit=1)
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base pipeline folder or hub id (default: see above)")
    p.add_argument("--concept", default=None, help="fine-tuned concept, any supported format")
    p.add_argument("--concept-phrase", default=None)
    p.add_argument("--superclass", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--host", default=None, help="default: 127.0.0.1, or GRADIO_SERVER_NAME (Spaces)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true")
    p.add_argument("--study", default=None, metavar="STUDY_DIR", help="also serve this pairwise user study "
                   "(`python -m personalize study build/demo`); its report needs PERSONALIZE_ADMIN_PASSWORD")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        lab = Lab(args.model, concept=args.concept, concept_phrase=args.concept_phrase,
                  superclass=args.superclass, device=args.device, dtype=args.dtype)
        demo = build_app(lab, study_dir=args.study)
        served = lab.served_folders()
        if args.study:
            from personalize.study.tasks import served_folders
            served += served_folders(args.study)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{lab.max_upload_mb}mb", allowed_paths=served)


if __name__ == "__main__":
    main()
