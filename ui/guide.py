"""Guide: what each sampler costs and when the study recommends it."""

from __future__ import annotations

import gradio as gr

from personalize.sampling.samplers import SAMPLERS


def guide_markdown() -> str:
    lines = ["| sampler | rule | denoiser rows per step | when to use it (the study, section 4) |",
             "|---|---|---|---|"]
    for s in SAMPLERS.values():
        lines.append(f"| **{s.title}** | `{s.formula}` | {s.cost_summary()} | {s.when} |")
    lines.append("")
    lines.append("The study's framework: start with **mixed** sampling (stable, 1.5x the batch of plain "
                 "sampling); if compute is tight, **switching** costs nothing extra but may lose identity; "
                 "try **masked** where mixed cannot balance concept and context; **ProFusion** keeps fidelity "
                 "at twice the compute; **Photoswap** behaves like switching.")
    return "\n".join(lines)


def create_guide() -> dict:
    with gr.Tab("Guide"):
        text = gr.Markdown(guide_markdown(), elem_id="guide")
    return {"text": text}
