"""Study: the pairwise user study (a participant's tasks, one at a time), an admin view of
the report, and the three web API endpoints of docs/interfaces.md (`/study_task`,
`/study_answer`, `/study_report`) on hidden components.

A participant is the Hugging Face login on a Space where they signed in, else an
anonymous id kept in their browser (encrypted with the study's own key, so it survives
a restart of the app). What task they are on lives in their `gr.State`."""

from __future__ import annotations

import os
import tempfile
import time
import uuid

import gradio as gr

from personalize.errors import UserError
from personalize.study.tasks import QUESTION_TEXT, QUESTIONS, Study, format_report

from .errors import shown

CHOICES = [("1", "1"), ("2", "2"), ("Can't decide", "cant_decide")]
INTRO = ("**User study.** Each task shows an original image of a subject, a text prompt, and two generated "
         "images. Answer the three questions with 1, 2 or *Can't decide*, then submit to get the next task.")


def participant_id(stored: str | None, profile: gr.OAuthProfile | None) -> str:
    """The Hugging Face user name when logged in, else the id kept in the browser (new if none)."""
    if profile is not None:
        return f"hf:{profile.username}"
    return stored or f"anon:{uuid.uuid4().hex}"


def task_outputs(study: Study, participant: str) -> tuple:
    """What the page shows for the participant's next task: reference, prompt, images 1 and
    2, progress, and the task state {id, since}."""
    shown_ = study.next_task(participant)
    if shown_ is None:
        done = study.progress(participant)
        return (None, "", None, None, f"You have answered all {done} tasks. Thank you!", None)
    return (shown_.reference, shown_.prompt, shown_.image_1, shown_.image_2,
            f"Task {shown_.answered + 1} of {shown_.total} (you have answered {shown_.answered}).",
            {"id": shown_.task, "since": time.time()})


def create_study(study: Study):
    with gr.Tab("Study"):
        stored_id = gr.BrowserState(None, storage_key=f"personalize-study-{study.data['id'][:12]}",
                                    secret=study.browser_secret())
        current = gr.State(None)
        gr.Markdown(INTRO)
        if os.environ.get("SPACE_ID"):  # on a Space, the Hugging Face login names the participant
            gr.LoginButton()
        progress = gr.Markdown(elem_id="study-progress")
        prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="study-prompt")
        with gr.Row():
            reference = gr.Image(label="Original image", type="filepath", interactive=False, height=280)
            image_1 = gr.Image(label="Image 1", type="filepath", interactive=False, height=280,
                               elem_id="study-image-1")
            image_2 = gr.Image(label="Image 2", type="filepath", interactive=False, height=280,
                               elem_id="study-image-2")
        radios = [gr.Radio(CHOICES, value=None, label=f"{k}. {QUESTION_TEXT[q]}", elem_id=f"study-q-{q}")
                  for k, q in enumerate(QUESTIONS, 1)]
        submit = gr.Button("Submit and next", variant="primary", elem_id="study-submit")
        with gr.Accordion("Admin: results", open=False):
            admin_password = gr.Textbox(label="Admin password", type="password")
            show = gr.Button("Show the report")
            report_text = gr.Code(label="Report", language=None, elem_id="study-report")
            report_json = gr.JSON(label="Report (JSON)")
            export = gr.File(label="All answers (CSV)")
        api = gr.Column(visible=False)  # inside the tab: gr.Tabs takes only tabs

    # The web API: inputs and outputs exactly as docs/interfaces.md lists them.
    with api:
        api_participant = gr.Textbox(label="participant id")
        api_task = gr.Textbox(label="task id")
        api_answers = [gr.Textbox(label=f"answer {k}: {QUESTION_TEXT[q]}") for k, q in enumerate(QUESTIONS, 1)]
        api_password = gr.Textbox(label="admin password")
        api_reference = gr.Image(label="reference image", type="filepath")
        api_prompt = gr.Textbox(label="prompt")
        api_image_1 = gr.Image(label="image 1", type="filepath")
        api_image_2 = gr.Image(label="image 2", type="filepath")
        api_task_id = gr.Textbox(label="task id")
        api_ack = gr.JSON(label="acknowledgement")
        api_report = gr.JSON(label="report")
        buttons = [gr.Button() for _ in range(3)]

    def start(stored, profile: gr.OAuthProfile | None):
        participant = participant_id(stored, profile)
        try:
            outputs = task_outputs(study, participant)
        except UserError as e:
            raise shown(e) from None
        keep = stored if profile is not None else participant  # a new anonymous id is kept in the browser
        return (keep, *outputs)

    def answer(stored, task, q_ts, q_is, q_all, profile: gr.OAuthProfile | None):
        participant = participant_id(stored, profile)
        try:
            if task is None:
                raise UserError("there is no task to answer")
            study.answer(participant, task["id"], [q_ts, q_is, q_all], seconds=time.time() - task["since"])
            outputs = task_outputs(study, participant)
        except UserError as e:
            raise shown(e) from None
        return (*outputs, *[None] * len(QUESTIONS))

    def admin(password):
        try:
            report = study.admin_report(password)
        except UserError as e:
            raise shown(e) from None
        path = os.path.join(tempfile.mkdtemp(prefix="personalize-study-"), "answers.csv")
        study.export(path)
        return format_report(report), report, path

    shown_task = [reference, prompt, image_1, image_2, progress, current]
    gr.on(None, start, [stored_id], [stored_id, *shown_task], api_visibility="private",
          concurrency_id="study", concurrency_limit=16)
    submit.click(answer, [stored_id, current, *radios], [*shown_task, *radios], api_visibility="private",
                 concurrency_id="study", concurrency_limit=16)
    show.click(admin, [admin_password], [report_text, report_json, export], api_visibility="private",
               concurrency_id="study_report", concurrency_limit=1)

    def study_task(participant):
        """The participant's next unanswered task: reference image, prompt, image 1, image 2,
        task id (empty, with no images, when every task is answered)."""
        try:
            s = study.next_task(participant)
        except UserError as e:
            raise shown(e) from None
        if s is None:
            return None, "All tasks are answered.", None, None, ""
        return s.reference, s.prompt, s.image_1, s.image_2, s.task

    def study_answer(participant, task_id, q_ts, q_is, q_all):
        """Store three answers ("1", "2" or "cant_decide") to one task; returns the answer id.
        A task answered again by the same participant keeps its first answer."""
        try:
            return study.answer(participant, task_id, [q_ts, q_is, q_all])
        except UserError as e:
            raise shown(e) from None

    def study_report(password):
        """The report (admin password required): answers, participants, and per pair and
        question wins, losses, ties, win rate and intervals, plus rankings and quality checks."""
        try:
            return study.admin_report(password)
        except UserError as e:
            raise shown(e) from None

    buttons[0].click(study_task, [api_participant], [api_reference, api_prompt, api_image_1, api_image_2,
                                                     api_task_id],
                     api_name="study_task", concurrency_id="study", concurrency_limit=16)
    buttons[1].click(study_answer, [api_participant, api_task, *api_answers], [api_ack],
                     api_name="study_answer", concurrency_id="study", concurrency_limit=16)
    buttons[2].click(study_report, [api_password], [api_report],
                     api_name="study_report", concurrency_id="study_report", concurrency_limit=1)
