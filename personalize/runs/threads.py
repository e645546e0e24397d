"""How many CPU threads torch uses while the app serves.

torch's CPU operators run in an OpenMP team that belongs to the Python thread calling
them. The app calls torch from several threads (the web server's handlers, a worker
thread per run, training jobs), so on a small CPU several teams wait for work at once and
take the cores from the team that has some: on a 2-core CPU one mixed image of the world
(25 steps) took 0.69 s from the main thread with two torch threads, 1.80 s from a run's
worker thread, and 1.9 s from the main thread again once other threads had used torch;
with one torch thread it took 0.74 s from any thread. A small model gains little from a
second thread anyway (30.6 ms against 28.6 ms for a 3-row denoiser call), so the app
serves with one thread on the CPU unless told otherwise.
"""

from __future__ import annotations

import os

import torch

from personalize.settings import whole_setting

THREADS_ENV = "PERSONALIZE_TORCH_THREADS"


def serving_threads(device: str, environ=os.environ) -> int:
    """The torch CPU thread count for serving on `device`: `$PERSONALIZE_TORCH_THREADS`
    where set (a whole number, at least 1), else 1 on the CPU; on a GPU, torch's own."""
    return whole_setting(THREADS_ENV, 1 if device == "cpu" else torch.get_num_threads(), environ)


def use_serving_threads(device: str, environ=os.environ) -> int:
    """Set torch's CPU thread count for serving (`serving_threads`) and return it."""
    n = serving_threads(device, environ)
    torch.set_num_threads(n)
    return n
