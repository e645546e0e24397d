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
    lines += ["", "### Reading the Explore tab",
              "Release a slider and the chosen sampler runs again at the same seed; its image sits between "
              "**concept sampling** (left: the fine-tuned model as it is) and **superclass sampling** (right: the "
              "prompt followed with the class noun), which are made once per prompt and seed. Its point moves on "
              "the IS/TS chart (IS: concept fidelity, TS: prompt following), linked to the previous one; a newer "
              "change stops a run still going. **Sweep this parameter** draws a whole curve at once. On a world "
              "model the judge's verdicts (concept shown? context followed?) stand beside IS and TS."]
    return "\n".join(lines)


def create_guide() -> dict:
    with gr.Tab("Guide", id="guide"):
        text = gr.Markdown(guide_markdown(), elem_id="guide")
    return {"text": text}
