"""How the UI shows a library error: as gradio's message box, with the text escaped
(messages hold placeholders like `<V*>` that the page would read as HTML)."""

import html

import gradio as gr


def shown(error: Exception) -> gr.Error:
    return gr.Error(html.escape(str(error), quote=False), print_exception=False)
