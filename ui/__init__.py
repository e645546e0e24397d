"""The Gradio app's tabs. Each `create_*` function builds one tab and only calls the
library (`personalize.runs.lab.Lab`); per-user data lives in `gr.State`."""
