"""The ONNX Runtime denoiser (`sampling/runtime.py`): the same images as PyTorch, a new
graph whenever the weights change (never a stale one), PyTorch where attention is reached
into, and clear refusals where it cannot run."""

import pytest
import torch
from safetensors.torch import save_file

from personalize.concepts.apply import apply_concept
from personalize.errors import UserError
from personalize.models.demo import build_pipeline
from personalize.prompts import prompt_pair
from personalize.runs.request import Request, check
from personalize.sampling import runtime as rt
from personalize.sampling.engine import run
from personalize.sampling.samplers import configure
from tests.helpers import rel_diff

pytest.importorskip("onnxruntime")

STEPS, SIZE, SEED = 4, 64, 3
TOL = 1e-4
PROMPTS = prompt_pair("a photo of a {} on the beach", "sks dog", "dog")


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of this module's own: the tests change its weights."""
    p = build_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def latents(pipe, runtime, name="mixed", **params):
    result = run(pipe, PROMPTS, configure(name, params, STEPS), seed=SEED, num_images=2, height=SIZE, width=SIZE,
                 concept_phrase="sks dog", decode=False, runtime=runtime)
    return result.latents, result.runtime


@pytest.mark.parametrize("name,params", [("mixed", {}), ("concept", {}), ("switching", {"t_sw": 2}),
                                         ("profusion", {"r": 0.5})])
def test_onnx_equals_torch(pipe, name, params):
    theirs, ran = latents(pipe, "torch", name, **params)
    ours, ran_onnx = latents(pipe, "onnx", name, **params)
    assert (ran, ran_onnx) == ("torch", "onnx")
    assert rel_diff(ours, theirs) < TOL
    # the seed matters far more than the runtime: the comparison can fail
    other = run(pipe, PROMPTS, configure(name, params, STEPS), seed=SEED + 1, num_images=2, height=SIZE,
                width=SIZE, concept_phrase="sks dog", decode=False, runtime="onnx").latents
    assert rel_diff(other, theirs) > 100 * TOL


def test_onnx_calls_no_torch_denoiser(pipe):
    latents(pipe, "onnx")  # the export traces through the module's forward: make it first
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        latents(pipe, "onnx")
        assert calls == []
        latents(pipe, "torch")
        assert len(calls) == STEPS  # the negative control: the hook does see PyTorch's calls
    finally:
        handle.remove()


def test_onnx_with_fractional_timesteps(pipe):
    """A scheduler whose timesteps are not whole numbers (Euler's, linspace spacing): the
    graph takes them as they are (cast to integers, every other step would be off)."""
    from diffusers import EulerDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config, timestep_spacing="linspace")
    try:
        pipe.scheduler.set_timesteps(7)
        assert any(float(t) != int(t) for t in pipe.scheduler.timesteps)  # the case this test is about
        config = configure("mixed", {}, 7)
        theirs, ours = (run(pipe, PROMPTS, config, seed=SEED, height=SIZE, width=SIZE, decode=False,
                            runtime=runtime) for runtime in ("torch", "onnx"))
        assert ours.runtime == "onnx" and rel_diff(ours.latents, theirs.latents) < TOL
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("name,params", [("masked", {"t_sw": 1}), ("photoswap", {"t_sf": 1, "t_cm": 2, "t_sm": 2})])
def test_attention_samplers_run_in_torch(pipe, name, params):
    theirs, _ = latents(pipe, "torch", name, **params)
    ours, ran = latents(pipe, "onnx", name, **params)
    assert ran == "torch"
    assert torch.equal(ours, theirs)


def test_new_weights_new_graph(pipe, tmp_path, monkeypatch):
    """A concept applied after a run, then removed, then an in-place edit: each run in ONNX
    matches PyTorch on the weights of that moment. A stale graph would give the base's.
    The base's graph is kept while the concept is on, and used again after."""
    exports = []
    original = rt.OnnxDenoiser.__init__
    monkeypatch.setattr(rt.OnnxDenoiser, "__init__", lambda self, *a: (exports.append(1), original(self, *a))[1])
    rt._EXPORTS.pop(pipe.unet, None)
    base, _ = latents(pipe, "onnx")
    assert len(exports) == 1
    assert torch.equal(latents(pipe, "onnx")[0], base) and len(exports) == 1  # same weights: the same graph
    conv = pipe.unet.conv_in.weight
    s = torch.linalg.svdvals(conv.detach().reshape(conv.shape[0], -1))
    save_file({"conv_in.delta": s * 0.8}, tmp_path / "spectral_shifts.safetensors")
    concept = apply_concept(pipe, tmp_path)
    try:
        with_concept, _ = latents(pipe, "onnx")
        assert rel_diff(with_concept, latents(pipe, "torch")[0]) < TOL
        assert rel_diff(with_concept, base) > 1e-3  # the concept changed the images
    finally:
        concept.remove()
    assert len(exports) == 2
    assert torch.equal(latents(pipe, "onnx")[0], base) and len(exports) == 2  # the base's graph, kept
    before = rt.fingerprint(pipe.unet)
    with torch.no_grad():
        pipe.unet.conv_out.bias.data[0] += 0.5  # through .data: no version bump, only the values tell
    try:
        assert rt.fingerprint(pipe.unet) != before
        edited, _ = latents(pipe, "onnx")
        assert rel_diff(edited, latents(pipe, "torch")[0]) < TOL
        assert rel_diff(edited, base) > 1e-3
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.data[0] -= 0.5


def test_adapter_switched_off_new_graph(pipe):
    """A LoRA adapter loaded through peft, then switched off without touching a tensor: the
    module settings in the fingerprint change, so the graph follows (it would otherwise
    still run the adapter)."""
    from peft import LoraConfig

    base, _ = latents(pipe, "onnx")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="probe")
    try:
        with_lora, _ = latents(pipe, "onnx")
        assert rel_diff(with_lora, latents(pipe, "torch")[0]) < TOL and rel_diff(with_lora, base) > 1e-3
        pipe.unet.disable_adapters()
        off, _ = latents(pipe, "onnx")
        assert rel_diff(off, latents(pipe, "torch")[0]) < TOL
        assert rel_diff(off, base) < 1e-5  # the adapter is off in the graph too
    finally:
        pipe.unet.delete_adapters("probe")


def test_weights_changed_during_export_are_not_cached(pipe, monkeypatch):
    """Another thread swaps the weights while a graph is traced: that graph serves its own
    run and is not filed under the fingerprint taken before the trace."""
    rt._EXPORTS.pop(pipe.unet, None)
    bias = pipe.unet.conv_out.bias
    original = rt.OnnxDenoiser.__init__

    def racing(self, unet, size):
        original(self, unet, size)
        bias.data = bias.data + 0.5  # "the other thread", after the trace, before filing

    monkeypatch.setattr(rt.OnnxDenoiser, "__init__", racing)
    saved = bias.data
    try:
        rt.onnx_denoiser(pipe.unet, (8, 8))
        assert len(rt._EXPORTS.get(pipe.unet, {})) == 0
    finally:
        bias.data = saved
    monkeypatch.undo()
    rt.onnx_denoiser(pipe.unet, (8, 8))
    assert len(rt._EXPORTS[pipe.unet]) == 1  # the negative control: unchanged weights are filed


@pytest.mark.parametrize("training", [True, False])
def test_export_leaves_the_module_as_it_was(pipe, training):
    """The trace runs in eval mode and must hand the module back in its own mode (else its
    fingerprint changes under it, and every run would export again)."""
    mode = pipe.unet.training
    pipe.unet.train(training)
    try:
        rt._EXPORTS.pop(pipe.unet, None)
        before = rt.fingerprint(pipe.unet)
        rt.onnx_denoiser(pipe.unet, (8, 8))
        assert pipe.unet.training == training and rt.fingerprint(pipe.unet) == before
        assert len(rt._EXPORTS[pipe.unet]) == 1
    finally:
        pipe.unet.train(mode)


def test_auto(pipe, monkeypatch):
    assert rt.denoiser_runner("auto", "sd", pipe.unet, (8, 8)) is not None
    assert rt.denoiser_runner("auto", "sdxl", pipe.unet, (8, 8)) is None
    assert rt.denoiser_runner("torch", "sd", pipe.unet, (8, 8)) is None
    monkeypatch.setattr(rt, "MAX_PARAMETERS", rt.parameter_count(pipe.unet) - 1)
    assert rt.denoiser_runner("auto", "sd", pipe.unet, (8, 8)) is None  # a large model stays in PyTorch
    with pytest.raises(UserError, match=r"--runtime onnx: this denoiser has \d+M parameters"):
        rt.denoiser_runner("onnx", "sd", pipe.unet, (8, 8))  # and asking for it is refused
    monkeypatch.undo()
    monkeypatch.setattr(rt, "onnx_available", lambda: False)
    assert rt.denoiser_runner("auto", "sd", pipe.unet, (8, 8)) is None
    with pytest.raises(UserError, match="onnxruntime package is not installed"):
        rt.denoiser_runner("onnx", "sd", pipe.unet, (8, 8))


@pytest.mark.parametrize("runtime,device,dtype,message", [
    ("tpu", "cpu", "float32", "--runtime: 'tpu' is not one of torch | onnx | auto"),
    ("onnx", "cpu", "float16", "CPU in float32 only"),
    ("onnx", "cuda", "float32", "CPU in float32 only"),
])
def test_bad_runtime(runtime, device, dtype, message):
    with pytest.raises(UserError, match=message.replace("|", r"\|")):
        rt.check_runtime(runtime, device, dtype)


def test_request_checks_runtime(demo_dir):
    with pytest.raises(UserError, match="--runtime"):
        check(Request(prompt="a {}", model=str(demo_dir), concept_phrase="sks dog", superclass="dog", steps=2,
                      runtime="fast"))


def test_onnx_refuses_other_families(pipe):
    with pytest.raises(UserError, match="SD 1.x/2.x pipelines only"):
        rt.denoiser_runner("onnx", "pixart", pipe.unet, (8, 8))


def test_generate_records_runtime(demo_dir, tmp_path):
    import json

    from personalize.cli import main

    out = tmp_path / "run"
    assert main(["generate", "--model", str(demo_dir), "--prompt", "a {}", "--concept-phrase", "sks dog",
                 "--superclass", "dog", "--steps", "2", "--sampler", "mixed", "--runtime", "onnx",
                 "--out", str(out)]) == 0
    card = json.loads((out / "run.json").read_text())
    assert card["runtime"] == "onnx"
    assert main(["generate", "--model", str(demo_dir), "--prompt", "a {}", "--concept-phrase", "sks dog",
                 "--superclass", "dog", "--steps", "2", "--runtime", "fast", "--out", str(tmp_path / "b")]) == 2
