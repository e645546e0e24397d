"""Latency of the live app: from a slider's release to the chosen sampler's final image.

`measure()` times what the server does for one slider change, exactly as the Explore tab
does it (`personalize.runs.live`): check the request, take the two ends from the cache,
run the chosen sampler, score its image (IS, TS and, on a world, the judge) and redraw
the chart, with torch's CPU threads set as the app sets them (`personalize.runs.threads`).
The first change loads the model, the metric model and the ends, and is not counted. A
browser adds its round trip and redraw; on the same 2-core machine (headless Chromium
sharing the cores with the run) that was about 0.4 s more (README, Run).

    python -m personalize.runs.latency --model /path/to/world --changes 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from personalize.runs.live import Live, LiveState, Shot, chart, make_lab, sweep_values
from personalize.runs.threads import use_serving_threads


def measure(model: str | None = None, *, changes: int = 20, sampler: str = "mixed", param: str = "w_s",
            steps: int | None = None, prompt: str | None = None, seed: int = 0, device: str = "cpu",
            dtype: str = "float32", threads: int | None = None) -> dict:
    """The median (and spread) over `changes` slider changes of `param` of the seconds from
    release to final image. `steps` and `prompt` default to the app's start (25 steps and
    a world prompt on a world, else 30 steps and a DreamBench-style prompt). `threads`
    overrides the app's torch thread count."""
    if threads:
        torch.set_num_threads(threads)
    else:
        use_serving_threads(device)
    lab = make_lab(model, device=device, dtype=dtype)
    live = Live(lab)
    steps = steps or (25 if live.world else 30)
    prompt = prompt or ("a {} on the beach" if live.world else "a photo of a {} on the beach")
    concept = copy.deepcopy(lab.default_concept)
    state = LiveState()
    values = sweep_values(sampler, param, steps, max(changes, 2))
    values = [values[k % len(values)] for k in range(changes + 1)]

    def change(value) -> float:
        started = time.perf_counter()
        stop = state.stop_for(state.new_request())
        prep = live.request(concept, prompt, sampler, {param: value}, seed=seed, steps=steps,
                            size=lab.default_size)
        live.ends(state, concept, prompt, seed=seed, steps=steps, size=lab.default_size)
        shot = None
        for item in live.stream(concept, prep, stop):
            if isinstance(item, Shot):
                shot = item
        state.shots.append(shot)
        chart(state)
        return time.perf_counter() - started

    warm = change(values[0])
    seconds = [change(v) for v in values[1:]]
    return {"model": lab.model, "world": live.world, "sampler": sampler, "param": param, "steps": steps,
            "changes": changes, "device": device, "torch_threads": torch.get_num_threads(),
            "first_change_s": round(warm, 3),
            "median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4), "seconds": [round(s, 4) for s in seconds]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base pipeline folder (default: as the app chooses)")
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--sampler", default="mixed")
    p.add_argument("--param", default="w_s")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as the app sets them)")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.model, changes=args.changes, sampler=args.sampler, param=args.param,
                             steps=args.steps, device=args.device, threads=args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
