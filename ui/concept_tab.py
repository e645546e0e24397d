"""Concept: another fine-tuned concept (path or upload), its phrase, superclass and references."""

from __future__ import annotations

import gradio as gr

from personalize.errors import UserError
from personalize.runs.lab import MAX_REFERENCES, Lab

from .errors import shown


def create_concept(lab: Lab, state: gr.State) -> dict:
    """The Concept tab. Returns its components and `done`, the event after a concept is
    applied (the app refreshes the Explore tab's reference images there)."""
    with gr.Tab("Concept"):
        gr.Markdown("The concept used by every run of your session. The phrase fills the prompt's "
                    "placeholder in the concept prompt (`sks dog`, or a textual-inversion token like "
                    "`<cat-toy>`), the superclass in the superclass prompt (`dog`).")
        with gr.Row():
            phrase = gr.Textbox(value=lab.default_concept.phrase, label="Concept phrase", elem_id="phrase")
            superclass = gr.Textbox(value=lab.default_concept.superclass, label="Superclass", elem_id="superclass")
        with gr.Row():
            path = gr.Textbox(label="Fine-tuned concept offered by the server: its name under the concepts "
                                    "folder (any supported format)",
                              value=lab.default_concept.weights or "")
            upload = gr.File(label=f"or upload (.safetensors only, at most {lab.max_upload_mb} MB)",
                             file_types=[".safetensors"], elem_id="concept-upload")
        ref_files = gr.File(label=f"Reference images of the concept (at most {MAX_REFERENCES})", file_count="multiple", file_types=["image"])
        apply = gr.Button("Use this concept", variant="primary", elem_id="apply-concept")
        status = gr.Markdown(elem_id="concept-status")

    def use(session, phrase_, superclass_, path_, upload_, refs_):
        try:
            concept = lab.make_concept(phrase_, superclass_, weights=path_ or None, upload=upload_,
                                       references=refs_ or None, current=session.concept)
        except UserError as e:
            raise shown(e) from None
        session.concept = concept
        weights = f"weights `{concept.weights}`" if concept.weights else "the base model's own weights"
        return (f"Using **{concept.phrase}** (superclass **{concept.superclass}**) with {weights} and "
                f"{len(concept.references)} reference image(s).", session)

    def check_upload(upload_):
        if upload_:
            try:
                lab.check_concept_upload(upload_)
            except UserError as e:
                raise shown(e) from None
        return ""
    upload.upload(check_upload, [upload], [status], api_visibility="private")
    done = apply.click(use, [state, phrase, superclass, path, upload, ref_files], [status, state],
                       api_visibility="private")
    return {"phrase": phrase, "superclass": superclass, "path": path, "upload": upload, "references": ref_files,
            "apply": apply, "status": status, "done": done}
