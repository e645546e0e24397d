"""What a user study folder holds and asks: file names, the questions and their wording,
the schedule of attention checks and repeats, and the form of a method's name."""

from __future__ import annotations

import re

FORMAT = "personalize-study/1"
TASKS = "tasks.json"
MEDIA = "media"
ADMIN_ENV = "PERSONALIZE_ADMIN_PASSWORD"
SECRET_ENV = "PERSONALIZE_STUDY_SECRET"   # signs participant tokens; else a key kept in the answers file
ANSWERS_ENV = "PERSONALIZE_STUDY_ANSWERS_PER_MINUTE"   # answers over the web per participant and minute
ANSWERS_PER_MINUTE = 20                   # a person reads three questions and two images per answer
QUESTION_TEXT = {
    "ts": "Which image is more consistent with the text prompt?",
    "is": "Which image better represents the original image?",
    "all": "Which image is generally better in terms of alignment with the prompt and concept identity preservation?",
}
QUESTION_LABEL = {"ts": "TS", "is": "IS", "all": "All"}  # Table 1's rows
SCHEDULE = {"check_every": 6, "repeat_every": 4, "repeat_gap": 2}
DEMO_PAIRS = (("mixed", "concept"), ("mixed", "switching"))
DEMO_PROMPTS = ("a {} in the jungle", "a {} in the snow", "a {} on the beach", "a red {}")
METHOD = re.compile(r"^(?P<sampler>[a-z_]+)(?:\[(?P<point>[^\[\]]+)\])?$")
PARTICIPANT = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
