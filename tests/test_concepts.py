"""Concept formats: detection, parity with diffusers' own loading (or independently
recomputed weights), exact removal, and clear refusals of bad files."""

import pytest
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import save_file

from personalize.concepts import apply as concepts
from personalize.concepts.apply import apply_concept
from personalize.concepts.files import detect_format
from personalize.errors import UserError
from personalize.models.demo import build_pipeline
from personalize.prompts import prompt_pair
from personalize.sampling.engine import run
from personalize.sampling.samplers import configure
from tests.helpers import rel_diff

STEPS, SIZE, W, SEED = 2, 64, 7.0, 5
TOL = 1e-4
ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


# -- fixtures and helpers ---------------------------------------------------------------

def snapshot(p) -> dict:
    """Everything a concept may change, copied."""
    state = {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder", "vae")
             for k, v in getattr(p, name).state_dict().items()}
    return {"state": state, "vocab": dict(p.tokenizer.get_vocab()), "config": p.text_encoder.config.to_dict(),
            "processors": {k: type(v) for k, v in p.unet.attn_processors.items()}}


def assert_unchanged(p, before: dict) -> None:
    after = snapshot(p)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"changed: {changed[:3]}"
    for key in ("vocab", "config", "processors"):
        assert after[key] == before[key], key


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    """Random weights underflow to denormal floats, which the CPU computes many times
    slower; every pipeline here runs under the same setting, so comparisons hold."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def base():
    p = build_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def base_latents(base):
    """Latents of the base model per concept phrase, before any concept is applied."""
    return {phrase: ours(base, phrase) for phrase in ("sks dog", "<new1> dog")}


@pytest.fixture
def pipe(base):
    """The shared base pipeline; each test must leave it bitwise as it found it."""
    before = snapshot(base)
    yield base
    leftover = concepts._ACTIVE.get(base)
    if leftover is not None:  # a failed test: clean up so the next tests start from the base
        leftover.remove()
    assert_unchanged(base, before)


def fresh():
    """A second pipeline with the same weights, for diffusers' own loading."""
    p = build_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def ours(p, phrase="sks dog"):
    prompts = prompt_pair("a photo of a {}", phrase, "dog")
    return run(p, prompts, configure("concept", {"w": W}, STEPS), seed=SEED, height=SIZE, width=SIZE,
               decode=False).latents


def theirs(p, phrase="sks dog"):
    return p(f"a photo of a {phrase}", num_inference_steps=STEPS, guidance_scale=W, height=SIZE, width=SIZE,
             generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images


def check_parity_and_removal(p, concept, reference, base_latents, phrase="sks dog"):
    """Our latents with the concept equal the reference's; remove() gives the base latents back."""
    with_concept = ours(p, phrase)
    assert rel_diff(with_concept, theirs(reference, phrase)) < TOL
    assert rel_diff(with_concept, base_latents[phrase]) > 1e-3  # the concept did something
    concept.remove()
    assert torch.equal(ours(p, phrase), base_latents[phrase])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- textual inversion ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
def test_textual_inversion_matches_diffusers(pipe, base_latents, tmp_path, layout):
    # Two vectors: diffusers adds the tokens "sks dog" and "sks dog_1".
    embedding = 0.05 * torch.randn(2, 64, generator=gen(1))
    if layout == "diffusers":
        file = tmp_path / "learned_embeds.safetensors"
        save_file({"<cat-toy>": embedding}, file)
    else:
        file = tmp_path / "concept.pt"
        torch.save({"string_to_param": {"*": embedding}, "name": "cat-toy", "step": 500}, file)
    assert detect_format(file) == "textual_inversion"
    concept = apply_concept(pipe, file, phrase="sks dog")
    assert (concept.format, concept.token) == ("textual_inversion", "sks dog")
    reference = fresh()
    reference.load_textual_inversion(str(file), token="sks dog")
    check_parity_and_removal(pipe, concept, reference, base_latents)


def test_textual_inversion_token_defaults_to_the_files(pipe, tmp_path):
    save_file({"<cat-toy>": torch.randn(64, generator=gen(2))}, tmp_path / "learned_embeds.safetensors")
    concept = apply_concept(pipe, tmp_path)
    assert concept.token == "<cat-toy>"
    concept.remove()


# -- LoRA -------------------------------------------------------------------------------

def lora_writer(unet_targets, text_targets, unet_alpha, text_alpha):
    """A pipeline with LoRA layers injected by peft itself (random, non-zero up matrices)."""
    from peft import LoraConfig, inject_adapter_in_model

    writer = fresh()
    torch.manual_seed(0)
    unet_config = LoraConfig(r=4, lora_alpha=unet_alpha, target_modules=unet_targets, init_lora_weights=False)
    text_config = LoraConfig(r=4, lora_alpha=text_alpha, target_modules=text_targets, init_lora_weights=False)
    writer.unet.add_adapter(unet_config)
    if text_targets:
        inject_adapter_in_model(text_config, writer.text_encoder)
    return writer, unet_config, text_config


def peft_layers(model) -> dict:
    """{module path: (A, B)} of a model's peft LoRA layers."""
    return {name: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_lora_diffusers_layout_matches_diffusers(pipe, base_latents, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    writer, unet_config, text_config = lora_writer(["to_q", "to_k", "to_v", "to_out.0"],
                                                   ["q_proj", "k_proj", "v_proj", "out_proj"], 8, 2)
    # As diffusers' DreamBooth-LoRA script saves: diffusers keys, the LoraConfigs as metadata.
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(writer.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(writer.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    assert detect_format(tmp_path) == "lora"
    concept = apply_concept(pipe, tmp_path)
    assert (concept.format, concept.token) == ("lora", None)
    latents = ours(pipe)
    reference = fresh()
    reference.load_lora_weights(str(tmp_path))
    assert rel_diff(latents, theirs(reference)) < TOL     # diffusers' own loading
    check_parity_and_removal(pipe, concept, writer, base_latents)       # peft's own layers


def kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def test_lora_kohya_layout_with_alphas(pipe, base_latents, tmp_path):
    """kohya keys and alphas, attention, MLP and conv layers in the UNet and attention plus
    MLP layers in the text encoder (a mix diffusers 0.42 alone would partly drop)."""
    writer, _, _ = lora_writer(["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
                               ["q_proj", "v_proj", "out_proj", "fc1", "fc2"], 2, 8)
    state = {}
    parts = (("lora_unet_", writer.unet, 2.0), ("lora_te_text_model_", writer.text_encoder, 8.0))
    for prefix, model, alpha in parts:
        for module, (down, up) in peft_layers(model).items():
            name = kohya_name(prefix, module)
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
            state[f"{name}.alpha"] = torch.tensor(alpha)
    file = tmp_path / "my_lora.safetensors"
    save_file(state, file)
    assert detect_format(file) == "lora"
    concept = apply_concept(pipe, file)
    check_parity_and_removal(pipe, concept, writer, base_latents)


def test_lora_scale(pipe, base_latents, tmp_path):
    writer, _, _ = lora_writer(["to_k", "to_v"], [], 4, 4)
    state = {f"unet.{m}.lora_A.weight": a for m, (a, b) in peft_layers(writer.unet).items()}
    state |= {f"unet.{m}.lora_B.weight": b for m, (a, b) in peft_layers(writer.unet).items()}
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    for name, layer in writer.unet.named_modules():  # halve peft's own scaling in the reference
        if hasattr(layer, "scaling") and "default" in layer.scaling:
            layer.scaling["default"] *= 0.5
    concept = apply_concept(pipe, tmp_path, scale=0.5)
    check_parity_and_removal(pipe, concept, writer, base_latents)


# -- SVDiff -----------------------------------------------------------------------------

UNET_SHIFTS = [f"{ATTN2}.to_k", "down_blocks.1.resnets.0.conv1", "down_blocks.1.attentions.0.proj_in",
               "down_blocks.1.resnets.0.norm1", "down_blocks.1.attentions.0.transformer_blocks.0.norm1", "conv_in"]
TEXT_SHIFTS = ["embeddings.token_embedding", "encoder.layers.0.self_attn.q_proj", "final_layer_norm"]


def deltas_for(model, names, seed) -> dict:
    """Hand-made spectral shifts: some push singular values below zero, so relu matters."""
    g, out = gen(seed), {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if w.ndim == 1:
            out[name] = torch.tensor([0.3]) * w.norm()
        else:
            s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
            out[name] = s * (torch.rand(s.shape, generator=g) * 2.2 - 1.6)
    return out


def recompute(weight, delta, scale):
    """SVDiff's W' = U diag(relu(S + scale*delta)) V^T, written out independently; a 1-D
    weight w is the rank-1 matrix (1, C), whose only singular value is |w|."""
    if weight.ndim == 1:
        norm = weight.norm()
        return weight * torch.relu(norm + scale * delta[0]) / norm
    u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
    return (u @ torch.diag(torch.relu(s + scale * delta)) @ vh).reshape(weight.shape)


@pytest.mark.parametrize("layout,scale", [("svdiff-pytorch", 1.0), ("study", 0.5)])
def test_svdiff_matches_recomputed_weights(pipe, base_latents, tmp_path, layout, scale):
    unet_deltas = deltas_for(pipe.unet, UNET_SHIFTS, 3)
    text_deltas = deltas_for(pipe.text_encoder, TEXT_SHIFTS, 4)
    if layout == "svdiff-pytorch":  # keys <module>.delta; its CLIP text model still says text_model.
        save_file({f"{k}.delta": d for k, d in unet_deltas.items()}, tmp_path / "spectral_shifts.safetensors")
        save_file({f"text_model.{k}.delta": d for k, d in text_deltas.items()},
                  tmp_path / "spectral_shifts_te.safetensors")
    else:  # keys <module>.<attr>.delta, one in torch's parametrize spelling
        unet_keys = {f"{k}.weight.delta": d for k, d in unet_deltas.items()}
        unet_keys["conv_in.parametrizations.weight.0.delta"] = unet_keys.pop("conv_in.weight.delta")
        torch.save(unet_keys, tmp_path / "unet.bin")
        torch.save({f"{k}.weight.delta": d for k, d in text_deltas.items()}, tmp_path / "text_encoder.bin")
    assert detect_format(tmp_path) == "svdiff"
    concept = apply_concept(pipe, tmp_path, scale=scale)
    reference = fresh()
    with torch.no_grad():
        for model, deltas in ((reference.unet, unet_deltas), (reference.text_encoder, text_deltas)):
            for name, delta in deltas.items():
                weight = model.get_submodule(name).weight
                weight.copy_(recompute(weight, delta, scale))
    loaded = pipe.unet.get_submodule(UNET_SHIFTS[1]).weight
    assert rel_diff(loaded.detach(), reference.unet.get_submodule(UNET_SHIFTS[1]).weight.detach()) < 1e-5
    check_parity_and_removal(pipe, concept, reference, base_latents)


# -- Custom Diffusion -------------------------------------------------------------------

def custom_diffusion_writer(tmp_path, safe: bool):
    """A pipeline with diffusers' Custom Diffusion processors (cross-attention k, v, q, out
    trained) and a modifier token, saved as diffusers' training script saves them."""
    writer = fresh()
    g, processors = gen(5), {}
    for name in writer.unet.attn_processors:
        attn = writer.unet.get_submodule(name.removesuffix(".processor"))
        train = name.endswith("attn2.processor")
        processor = CustomDiffusionAttnProcessor(
            train_kv=train, train_q_out=train, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features if train else None)
        if train:
            with torch.no_grad():
                for mine, base in ((processor.to_k_custom_diffusion, attn.to_k),
                                   (processor.to_v_custom_diffusion, attn.to_v),
                                   (processor.to_q_custom_diffusion, attn.to_q),
                                   (processor.to_out_custom_diffusion[0], attn.to_out[0])):
                    mine.weight.copy_(base.weight + 0.3 * torch.randn(base.weight.shape, generator=g))
                    if base.bias is not None:
                        mine.bias.copy_(base.bias)
        processors[name] = processor
    writer.unet.set_attn_processor(processors)
    writer.unet.save_attn_procs(tmp_path, safe_serialization=safe)
    token_file = tmp_path / ("<new1>.safetensors" if safe else "<new1>.bin")
    embedding = {"<new1>": 0.05 * torch.randn(64, generator=g)}
    save_file(embedding, token_file) if safe else torch.save(embedding, token_file)
    writer.load_textual_inversion(str(token_file))
    return writer


@pytest.mark.parametrize("safe", [False, True])
def test_custom_diffusion_matches_diffusers(pipe, base_latents, tmp_path, safe):
    writer = custom_diffusion_writer(tmp_path, safe)
    assert detect_format(tmp_path) == "custom_diffusion"
    concept = apply_concept(pipe, tmp_path, phrase="<new1> dog")
    assert (concept.format, concept.token) == ("custom_diffusion", "<new1>")
    check_parity_and_removal(pipe, concept, writer, base_latents, phrase="<new1> dog")


def test_custom_diffusion_phrase_must_hold_the_token(pipe, tmp_path):
    custom_diffusion_writer(tmp_path, safe=True)
    with pytest.raises(UserError, match="<new1>"):
        apply_concept(pipe, tmp_path, phrase="sks dog")


# -- DreamBooth -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dreambooth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dreambooth") / "model"
    build_pipeline(seed=11).save_pretrained(out)
    return out


def test_dreambooth_pipeline_folder(pipe, base_latents, dreambooth_dir):
    assert detect_format(dreambooth_dir) == "dreambooth"
    tuned = build_pipeline(seed=11)  # the weights saved in the folder
    tuned.set_progress_bar_config(disable=True)
    concept = apply_concept(pipe, dreambooth_dir)
    for name in ("unet", "text_encoder"):
        mine, theirs_ = getattr(pipe, name).state_dict(), getattr(tuned, name).state_dict()
        assert all(torch.equal(v, theirs_[k]) for k, v in mine.items())
    check_parity_and_removal(pipe, concept, tuned, base_latents)


def test_dreambooth_unet_only(pipe, dreambooth_dir, tmp_path):
    import shutil

    shutil.copytree(dreambooth_dir / "unet", tmp_path / "unet")
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    concept = apply_concept(pipe, tmp_path)
    assert concept.format == "dreambooth"
    assert all(torch.equal(v, text_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert not torch.equal(pipe.unet.conv_in.weight, fresh().unet.conv_in.weight)
    concept.remove()


# -- detection and bad files ------------------------------------------------------------

def test_detect_format_by_layout(tmp_path):
    (tmp_path / "db" / "text_encoder").mkdir(parents=True)
    (tmp_path / "db" / "text_encoder" / "config.json").write_text("{}")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, tmp_path / "kohya.safetensors")
    save_file({"conv_in.delta": torch.zeros(4)}, tmp_path / "spectral_shifts.safetensors")
    torch.save({f"{ATTN2}.processor.to_k_custom_diffusion.weight": torch.zeros(64, 64)}, tmp_path / "cd.bin")
    torch.save(torch.zeros(64), tmp_path / "bare.bin")
    assert detect_format(tmp_path / "db") == "dreambooth"
    assert detect_format(tmp_path / "kohya.safetensors") == "lora"
    assert detect_format(tmp_path / "spectral_shifts.safetensors") == "svdiff"
    assert detect_format(tmp_path / "cd.bin") == "custom_diffusion"
    assert detect_format(tmp_path / "bare.bin") == "textual_inversion"


class NotATensor:
    """Pickled into a .bin: weights_only loading must refuse it."""


def write_bad(case: str, folder):
    """Write one bad concept; returns (path to give, file name the error must name)."""
    t = torch.randn
    if case == "unknown layout":
        save_file({"foo.weight": t(3, 3), "bar": t(2)}, folder / "mystery.safetensors")
        return folder / "mystery.safetensors", "mystery.safetensors"
    if case == "unknown folder":
        for name in ("a.safetensors", "b.safetensors"):
            save_file({"x": t(2)}, folder / name)
        return folder, folder.name
    if case == "list in a .bin":
        torch.save([t(2)], folder / "weights.bin")
        return folder / "weights.bin", "weights.bin"
    if case == "corrupt safetensors":
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" * 5)
        return folder, "pytorch_lora_weights.safetensors"
    if case == "truncated safetensors":
        save_file({"conv_in.delta": t(4)}, folder / "spectral_shifts.safetensors")
        data = (folder / "spectral_shifts.safetensors").read_bytes()
        (folder / "spectral_shifts.safetensors").write_bytes(data[:-6])
        return folder, "spectral_shifts.safetensors"
    if case == "pickled object":
        torch.save({"<tok>": NotATensor()}, folder / "learned_embeds.bin")
        return folder, "learned_embeds.bin"
    if case == "pickled object, unnamed file":
        torch.save({"<tok>": NotATensor()}, folder / "concept.bin")
        return folder / "concept.bin", "concept.bin"
    if case == "embedding size":
        save_file({"<tok>": t(32)}, folder / "learned_embeds.safetensors")
        return folder, "learned_embeds.safetensors"
    if case == "lora shape":
        save_file({f"unet.{ATTN2}.to_k.lora_A.weight": t(4, 77), f"unet.{ATTN2}.to_k.lora_B.weight": t(64, 4)},
                  folder / "pytorch_lora_weights.safetensors")
        return folder, "pytorch_lora_weights.safetensors"
    if case == "lora layer missing":
        layer = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_k"
        save_file({f"{layer}.lora_A.weight": t(4, 64), f"{layer}.lora_B.weight": t(64, 4)},
                  folder / "pytorch_lora_weights.safetensors")
        return folder, "pytorch_lora_weights.safetensors"
    if case == "svdiff delta length":
        save_file({f"{ATTN2}.to_k.delta": t(64), "conv_in.delta": t(99)}, folder / "spectral_shifts.safetensors")
        return folder, "spectral_shifts.safetensors"
    if case == "svdiff NaN":
        save_file({"conv_in.delta": torch.full((4,), float("nan"))}, folder / "spectral_shifts.safetensors")
        return folder, "spectral_shifts.safetensors"
    if case == "svdiff layer missing":
        torch.save({"mid_block.nothing_here.weight.delta": t(4)}, folder / "unet.bin")
        return folder, "unet.bin"
    if case == "custom diffusion shape":
        torch.save({f"{ATTN2}.processor.to_k_custom_diffusion.weight": t(64, 77),
                    f"{ATTN2}.processor.to_v_custom_diffusion.weight": t(64, 64)},
                   folder / "pytorch_custom_diffusion_weights.bin")
        return folder, "pytorch_custom_diffusion_weights.bin"
    if case == "dreambooth other model":
        from diffusers import UNet2DConditionModel
        UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                             cross_attention_dim=64, attention_head_dim=4).save_pretrained(folder / "unet")
        return folder, "diffusion_pytorch_model.safetensors"
    raise AssertionError(case)


BAD = ["unknown layout", "unknown folder", "list in a .bin", "corrupt safetensors", "truncated safetensors",
       "pickled object", "pickled object, unnamed file", "embedding size", "lora shape", "lora layer missing",
       "svdiff delta length", "svdiff NaN", "svdiff layer missing", "custom diffusion shape",
       "dreambooth other model"]


@pytest.mark.parametrize("case", BAD)
def test_bad_concept_is_refused_and_base_untouched(pipe, tmp_path, case):
    path, name = write_bad(case, tmp_path)
    with pytest.raises(UserError) as error:
        apply_concept(pipe, path, phrase="sks dog")
    assert name in str(error.value), str(error.value)
    if "pickled" in case:
        assert "weights_only" in str(error.value)
    assert concepts._ACTIVE.get(pipe) is None  # the fixture checks the weights bitwise


def test_missing_path_and_scale_and_stacking(pipe, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        apply_concept(pipe, tmp_path / "nope")
    save_file({"<cat-toy>": torch.randn(64)}, tmp_path / "learned_embeds.safetensors")
    with pytest.raises(UserError, match="scale"):
        apply_concept(pipe, tmp_path, scale=0.5)
    with pytest.raises(UserError, match="already in the tokenizer"):
        apply_concept(pipe, tmp_path, phrase="<|endoftext|>")
    concept = apply_concept(pipe, tmp_path)
    with pytest.raises(UserError, match="remove it first"):
        apply_concept(pipe, tmp_path)
    concept.remove()
    concept.remove()  # a second remove does nothing



@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_concept_file_is_read_once(pipe, tmp_path, monkeypatch, suffix):
    # A file with no telling name is classified by its keys: from the header (safetensors) or
    # a memory map (PyTorch zip), so the data is read once, by the loader.
    import safetensors.torch

    embedding = 0.05 * torch.randn(1, 64, generator=gen(2))
    file = tmp_path / f"my_concept{suffix}"
    if suffix == ".safetensors":
        save_file({"<my-token>": embedding}, file)
    else:
        torch.save({"<my-token>": embedding}, file)
    reads = []
    real_load_file, real_torch_load = safetensors.torch.load_file, torch.load

    def load_file(*a, **k):
        reads.append("safetensors")
        return real_load_file(*a, **k)

    def torch_load(*a, **k):
        if not k.get("mmap"):
            reads.append("torch.load")
        return real_torch_load(*a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(torch, "load", torch_load)
    assert detect_format(file) == "textual_inversion"
    assert reads == []
    concept = apply_concept(pipe, file, phrase="sks dog")
    try:
        assert len(reads) == 1 and concept.format == "textual_inversion"
    finally:
        concept.remove()
