"""Study: the pairwise user study (a participant's tasks, one at a time), an admin view of
the report, and the three web API endpoints of docs/interfaces.md (`/study_task`,
`/study_answer`, `/study_report`) on hidden components.

A participant is the Hugging Face login on a Space where they signed in (an OAuth profile
the server received, never an id a client typed), else an anonymous token the server
signed, kept in their browser. What task they are on lives in their `gr.State`; web API
clients get a token from `/study_join` and answer only the tasks (tickets) `/study_task`
gave that token."""

from __future__ import annotations

import os
import tempfile
import time

import gradio as gr

from personalize.errors import UserError
from personalize.study.layout import QUESTION_TEXT
from personalize.study.report import format_report
from personalize.study.store import QUESTIONS
from personalize.study.tasks import Study

from .errors import shown
from .serving import JOINS_ENV, JOINS_PER_MINUTE, RateLimit

CHOICES = [("1", "1"), ("2", "2"), ("Can't decide", "cant_decide")]
INTRO = ("**User study.** Each task shows an original image of a subject, a text prompt, and two generated "
         "images. Answer the three questions with 1, 2 or *Can't decide*, then submit to get the next task.")


def participant_id(study: Study, stored: str | None, profile: gr.OAuthProfile | None) -> tuple[str, str | None]:
    """(participant, token to keep in the browser): the Hugging Face user name when the
    server received a login, else the participant of the signed token kept in the browser
    (a new token if there is none, or if it is not one this study signed)."""
    if isinstance(profile, gr.OAuthProfile) and profile.username:
        return study.hf_participant(profile.username), stored
    try:
        return study.participant(stored), stored
    except UserError:
        token = study.new_participant()
        return study.participant(token), token


def task_outputs(study: Study, participant: str) -> tuple:
    """What the page shows for the participant's next task: reference, prompt, images 1 and
    2, progress, and the task state {id, participant, since}."""
    shown_ = study.next_task(participant)
    if shown_ is None:
        done = study.progress(participant)
        return (None, "", None, None, f"You have answered all {done} tasks. Thank you!", None)
    return (shown_.reference, shown_.prompt, shown_.image_1, shown_.image_2,
            f"Task {shown_.answered + 1} of {shown_.total} (you have answered {shown_.answered}).",
            {"id": shown_.task, "participant": participant, "since": time.time()})


def create_study(study: Study, joins: RateLimit | None = None):
    """The Study tab and the study's web API; `joins` bounds new participants per client."""
    joins = joins or RateLimit(env=JOINS_ENV, default=JOINS_PER_MINUTE, what="new participants")
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
            reference = gr.Image(label="Original image", type="filepath", interactive=False, height=280,
                                 elem_id="study-reference")
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
        api_token = gr.Textbox(label="participant token")
        buttons = [gr.Button() for _ in range(4)]

    def start(stored, profile: gr.OAuthProfile | None):
        try:
            participant, keep = participant_id(study, stored, profile)
            outputs = task_outputs(study, participant)
        except UserError as e:
            raise shown(e) from None
        return (keep, *outputs)

    def answer(stored, task, q_ts, q_is, q_all, profile: gr.OAuthProfile | None):
        try:
            if task is None:
                raise UserError("there is no task to answer")
            participant, _ = participant_id(study, stored, profile)
            if participant != task.get("participant"):
                raise UserError("this task was given to another participant; reload the page")
            study.served_answer(participant, task["id"], [q_ts, q_is, q_all],
                                 seconds=time.time() - task["since"])
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

    def study_join(request: gr.Request = None):
        """A new participant token, signed by the server: give it to /study_task and
        /study_answer for the whole study."""
        try:
            joins.check(request)
        except UserError as e:
            raise shown(e) from None
        return study.new_participant()

    def study_task(participant):
        """The participant's next unanswered task: reference image, prompt, image 1, image 2,
        task id (empty, with no images, when every task is answered). The participant id is
        a token from /study_join; the task id is for this participant only."""
        try:
            s, ticket = study.task_for(participant)
        except UserError as e:
            raise shown(e) from None
        if s is None:
            return None, "All tasks are answered.", None, None, ""
        return s.reference, s.prompt, s.image_1, s.image_2, ticket

    def study_answer(participant, task_id, q_ts, q_is, q_all):
        """Store three answers ("1", "2" or "cant_decide") to a task /study_task gave this
        participant; returns the answer id. A task answered again keeps its first answer."""
        try:
            return study.answer_ticket(participant, task_id, [q_ts, q_is, q_all])
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
    buttons[3].click(study_join, None, [api_token], api_name="study_join", concurrency_id="study",
                     concurrency_limit=16)
