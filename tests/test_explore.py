"""The live instrument's library (personalize.runs.live): batched sampler points equal
single runs, a newer request stops an older run, sweep ranges, overlays and the chart."""

import pytest
import torch
from PIL import Image

from personalize.runs.live import (LiveState, Shot, chart, describe, is_linear, overlay, params_of, run_points,
                                   show_at, sweep_values)
from personalize.sampling import engine
from personalize.sampling.samplers import configure

STEPS = 4


@pytest.mark.parametrize("configs", [
    [("mixed", {"w_s": 0.0}), ("mixed", {"w_s": 2.0}), ("mixed", {"w_s": 5.0})],
    [("concept", {}), ("superclass", {}), ("switching", {"t_sw": 2})],
])
def test_run_points_equal_single_runs(pipe, prompts, configs):
    configs = [configure(name, params, STEPS) for name, params in configs]
    batched = run_points(pipe, prompts, configs, seed=3)
    for config, got in zip(configs, batched):
        alone = engine.run(pipe, prompts, config, seed=3)
        assert torch.allclose(got.latents, alone.latents, atol=1e-4), config
        assert got.rows == alone.rows and got.step_rows == alone.step_rows
    # negative control: the points differ from each other
    assert not torch.allclose(batched[0].latents, batched[1].latents, atol=1e-3)


def test_run_points_refuses_masked_plans(pipe, prompts):
    masked = configure("masked", {}, STEPS)
    assert not is_linear(masked) and is_linear(configure("mixed", {}, STEPS))
    with pytest.raises(Exception, match="one at a time"):
        run_points(pipe, prompts, [masked], seed=0)


def test_newer_request_stops_the_older_run_at_its_next_step(pipe, prompts):
    state = LiveState()
    stop = state.stop_for(state.new_request())
    seen = []

    def on_step(info):
        seen.append(info["step"])
        if info["step"] == 1:
            state.new_request()  # a newer slider change arrives during step 1
    with pytest.raises(engine.Stopped, match="step 2"):
        engine.run(pipe, prompts, configure("mixed", {}, STEPS), callback=on_step, stop=stop)
    assert seen == [0, 1]
    # the newest request is not stopped
    fresh = state.stop_for(state.latest)
    assert not fresh.is_set()
    engine.run(pipe, prompts, configure("mixed", {}, 2), stop=fresh)


def test_sweep_values():
    assert sweep_values("mixed", "w_s", 25) == [float(v) for v in range(8)]
    assert sweep_values("switching", "t_sw", 10, 8) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert sweep_values("masked", "q", 25, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sweep_values("masked", "mask_source", 25) == ["superclass", "concept"]
    with pytest.raises(Exception, match="at least 2"):
        sweep_values("mixed", "w_s", 25, 1)


def test_params_of_types_step_counts():
    assert params_of("switching", [7.0, 3.0]) == {"w": 7.0, "t_sw": 3}
    assert isinstance(params_of("switching", [7.0, 3.0])["t_sw"], int)


def test_overlay_and_display_size():
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))  # the left half
    out = overlay(image, mask)
    assert out.getpixel((5, 30))[0] > 50 and out.getpixel((60, 30)) == (0, 0, 255)
    assert overlay(image, None) is image
    big = show_at(image, 256)
    assert big.size == (256, 256) and show_at(Image.new("RGB", (512, 512)), 256).size == (512, 512)


def shot(sampler, params, is_, ts):
    card = {"sampler": sampler, "params": params, "is": is_, "ts": ts, "denoiser_rows": 3, "seconds": 0.1}
    return Shot(Image.new("RGB", (8, 8)), card)


def test_chart_highlights_current_links_previous_and_draws_the_sweep():
    state = LiveState()
    state.ends = {"key": (shot("concept", {"w": 7.0}, 0.9, 0.2), shot("superclass", {"w": 7.0}, 0.3, 0.3))}
    state.shots = [shot("mixed", {"w_c": 3.5, "w_s": 1.0}, 0.8, 0.22), shot("mixed", {"w_c": 3.5, "w_s": 4.0}, 0.6, 0.27)]
    state.sweep = [shot("mixed", {"w_c": 3.5, "w_s": float(v)}, 0.9 - v / 10, 0.2 + v / 100) for v in range(8)]
    state.sweep_param = "w_s"
    traces = {t.name: t for t in chart(state).data}
    assert list(traces["current"].x) == [0.27] and "w_s=4" in traces["current"].text[0]
    assert list(traces["previous → current"].x) == [0.22, 0.27]
    assert len(traces["sweep: w_s"].x) == 8
    assert {"concept sampling", "superclass sampling", "this session"} <= set(traces)
    assert describe(state.shots[0]) == "mixed sampling (w_c=3.5, w_s=1)"
