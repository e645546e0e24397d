"""The command line: demo-model, samplers, generate (outputs, identities, bad input)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from personalize.cli import main
from personalize.sampling.samplers import SAMPLERS, configure, plan, total_rows
from tests.helpers import rel_diff

STEPS = 6


def generate(demo_dir, out, *extra, sampler="concept", prompt="a photo of a {} on the beach"):
    return main(["generate", "--model", str(demo_dir), "--prompt", prompt, "--sampler", sampler,
                 "--steps", str(STEPS), "--height", "64", "--width", "64", "--out", str(out), *extra])


def test_demo_model_folder(demo_dir):
    concept = json.loads((demo_dir / "concept.json").read_text())
    assert concept["phrase"] == "sks dog" and concept["superclass"] == "dog"
    assert concept["references"] and all((demo_dir / p).is_file() for p in concept["references"])
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (demo_dir / part).is_dir()


def test_samplers_json(capsys):
    assert main(["samplers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == list(SAMPLERS)
    mixed = next(s for s in listed if s["name"] == "mixed")
    assert mixed["rows_per_step"] == 3
    assert {p["name"]: p["default"] for p in mixed["params"]} == {"w_c": 3.5, "w_s": 3.5}


def test_generate_writes_images_and_run_card(demo_dir, tmp_path):
    out = tmp_path / "run"
    assert generate(demo_dir, out, "--num-images", "2", "--save-latents", "--seed", "3", sampler="mixed") == 0
    card = json.loads((out / "run.json").read_text())
    assert card["images"] == ["image_000.png", "image_001.png"]
    assert all((out / name).is_file() for name in card["images"])
    assert card["sampler"] == "mixed" and card["params"] == {"w_c": 3.5, "w_s": 3.5}
    assert card["prompts"]["concept"] == "a photo of a sks dog on the beach"
    assert card["prompts"]["superclass"] == "a photo of a dog on the beach"
    assert card["seed"] == 3 and card["steps"] == STEPS and card["num_images"] == 2
    assert card["height"] == card["width"] == 64
    assert card["denoiser_rows"] == total_rows(plan(configure("mixed", {}, STEPS)), 2) == 3 * STEPS * 2
    assert card["versions"]["diffusers"] and card["seconds"] > 0
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == np.float32


@pytest.mark.parametrize("left,right", [
    (("mixed", ["--set", "w_s=0", "--set", "w_c=7"]), ("concept", ["--set", "w=7"])),
    (("switching", ["--set", f"t_sw={STEPS}"]), ("superclass", [])),
    (("masked", ["--set", f"t_sw={STEPS}", "--set", "w_c0=2", "--set", "w_s0=5"]),
     ("mixed", ["--set", "w_c=2", "--set", "w_s=5"])),
    (("photoswap", ["--set", "t_sf=0", "--set", "t_cm=0", "--set", "t_sm=0"]), ("concept", [])),
])
def test_identities_through_generate(demo_dir, tmp_path, left, right):
    a, b = tmp_path / "a", tmp_path / "b"
    assert generate(demo_dir, a, "--save-latents", *left[1], sampler=left[0]) == 0
    assert generate(demo_dir, b, "--save-latents", *right[1], sampler=right[0]) == 0
    assert rel_diff(np.load(a / "latents.npy"), np.load(b / "latents.npy")) < 1e-4
    rows_a = json.loads((a / "run.json").read_text())["denoiser_rows"]
    rows_b = json.loads((b / "run.json").read_text())["denoiser_rows"]
    assert (rows_a, rows_b) == tuple(
        total_rows(plan(configure(s, {k: json.loads(v) for k, v in (x.split("=") for x in p[1::2])}, STEPS)))
        for s, p in (left, right))


def test_per_step_list_through_generate(demo_dir, tmp_path):
    out = tmp_path / "list"
    ws = json.dumps([7, 7, 0, 0, 0, 0])
    assert generate(demo_dir, out, "--set", f"w_s={ws}", "--set", "w_c=3", sampler="mixed") == 0
    card = json.loads((out / "run.json").read_text())
    assert card["params"]["w_s"] == [7, 7, 0, 0, 0, 0]
    assert card["denoiser_rows_per_step"] == [3, 3, 2, 2, 2, 2]


def test_save_steps_for_masked(demo_dir, tmp_path):
    out = tmp_path / "masked"
    assert generate(demo_dir, out, "--save-steps", "--set", "t_sw=2", sampler="masked") == 0
    steps = out / "steps"
    assert sorted(p.name for p in steps.glob("step_*_image_000.png")) == [
        f"step_{i:03d}_image_000.png" for i in range(STEPS)]
    assert not (steps / "step_001_attention.npy").exists()
    attention = np.load(steps / "step_002_attention.npy")
    mask = np.load(steps / "step_002_mask.npy")
    assert attention.shape == mask.shape == (1, 8, 8)
    assert mask.dtype == bool and mask.mean() == pytest.approx(0.3, abs=1.5 / 64)
    assert (steps / "step_005_mask_000.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a photo of a dog"], "--prompt: 'a photo of a dog' has no placeholder"),
    (["--sampler", "fancy"], "unknown sampler 'fancy'; accepted: concept | superclass"),
    (["--sampler", "mixed", "--set", "w=3"], "unknown parameter 'w' for sampler 'mixed'; accepted: w_c, w_s"),
    (["--set", "w=lots"], "parameter w: 'lots' is not a number"),
    (["--sampler", "switching", "--set", "t_sw=99"], "parameter t_sw: 99 is outside [0, 6]"),
    (["--sampler", "mixed", "--set", "w_c=[1,2,3]"], "one value per step (6), got 3"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--model", "/nonexistent/model"], "--model: the folder /nonexistent/model does not exist"),
    (["--sampler", "masked", "--set", "q=2"], "parameter q: 2 is outside [0.0, 1.0]"),
    (["--sampler", "photoswap", "--set", "t_sf=-1"], "parameter t_sf: -1 is outside"),
    (["--device", "tpu"], "--device: 'tpu' is not one of cpu | cuda | mps"),
])
def test_bad_input_one_line_exit_2_nothing_written(demo_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    # argparse keeps the last of a repeated option, so `args` override these
    argv = ["generate", "--model", str(demo_dir), "--prompt", "a photo of a {}", "--steps", str(STEPS),
            "--height", "64", "--width", "64", "--out", str(out), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "a {}", "--out", str(tmp_path / "o")]) == 2
    assert "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(demo_dir, tmp_path, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert generate(demo_dir, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "precious"


def test_subprocess_exit_status():
    """`python -m personalize` exits with `main`'s status and prints its one-line error
    (the errors themselves are tested in-process above; a light verb keeps this quick)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "personalize", "samplers", "--no-such-option"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unrecognized arguments: --no-such-option" in done.stderr


def test_generate_with_textual_inversion_equals_diffusers(demo_dir, tmp_path):
    """A concept file written independently (safetensors, token -> embedding) through
    `generate --concept`, against diffusers' own pipeline with `load_textual_inversion`."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    embedding = torch.randn(1, 64, generator=torch.Generator().manual_seed(9))
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<my-toy>": embedding}, str(file))
    out = tmp_path / "ti"
    assert generate(demo_dir, out, "--concept", str(file), "--concept-phrase", "<my-toy>", "--superclass", "toy",
                    "--save-latents", "--seed", "2", prompt="a photo of a {} on the beach") == 0
    card = json.loads((out / "run.json").read_text())
    assert card["concept"]["format"] == "textual_inversion"

    reference = StableDiffusionPipeline.from_pretrained(str(demo_dir), safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(str(file))
    theirs = reference("a photo of a <my-toy> on the beach", num_inference_steps=STEPS, guidance_scale=7.0,
                       height=64, width=64, generator=torch.Generator("cpu").manual_seed(2),
                       output_type="latent").images
    assert rel_diff(np.load(out / "latents.npy"), theirs) < 1e-4

    # the same model without the concept again: the token is gone, the base weights are back
    plain = tmp_path / "plain"
    assert generate(demo_dir, plain, "--save-latents", "--seed", "2") == 0
    base = StableDiffusionPipeline.from_pretrained(str(demo_dir), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    theirs = base("a photo of a sks dog on the beach", num_inference_steps=STEPS, guidance_scale=7.0, height=64,
                  width=64, generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images
    assert rel_diff(np.load(plain / "latents.npy"), theirs) < 1e-4


def test_bad_concept_file(demo_dir, tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"this is not safetensors")
    out = tmp_path / "never"
    assert generate(demo_dir, out, "--concept", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err
    assert not out.exists()


def test_top_level_help_imports_no_verb_module():
    """Library modules import torch and diffusers at their top; `personalize --help`
    lists the verbs without importing them. The negative control: naming a verb loads
    that verb's module (`samplers`, a light one, keeps the test quick)."""
    probe = ("import sys\nfrom personalize.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'personalize.cli.samplers', 'personalize.cli.world')"
             " if m in sys.modules))")
    help_all = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, check=True)
    assert "sweep" in help_all.stdout and "world" in help_all.stdout  # every verb is listed
    assert help_all.stdout.strip().splitlines()[-1] == "[]"
    one = subprocess.run([sys.executable, "-c", probe, "samplers", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--json" in one.stdout
    assert one.stdout.strip().splitlines()[-1] == "['personalize.cli.samplers']"
