"""`train_concept`: one training loop for every method (diffusers' examples' loop).

Each step: draw a batch of concept photos (uniformly, with replacement), sample their VAE
posterior, add noise at uniform timesteps with a DDPMScheduler built from the pipeline's
own scheduler config, predict with the UNet, and take the mean squared error to the target
the model predicts (noise, velocity or sample). The VAE is frozen. A method (SVDiff,
DreamBooth, LoRA, textual inversion) only decides which tensors train and how they are
saved: it works on copies of the UNet and text encoder(s), so the caller's pipeline is
never changed.

Every random draw of step k comes from a generator seeded with (seed, k): a run is
deterministic on the CPU, and resuming from a checkpoint gives the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from ..errors import UserError
from ..sampling.backbones import backbone
from .data import check_images, to_tensor
from .recipes import Recipe
from .recipes import recipe as default_recipe

# Which pipeline families each method trains on.
APPLIES = {"svdiff": ("sd",), "textual-inversion": ("sd",), "dreambooth": ("sd", "sdxl"), "lora": ("sd", "sdxl")}
FAMILY_TITLES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SD-XL", "pixart": "PixArt-alpha"}
PROBE_IMAGES = 4
PROBE_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)   # fractions of the training timesteps
PROBE_BATCH = 10
CHECKPOINTS = "checkpoints"
CONCEPT_JSON = "concept.json"
REFERENCES = "references"
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class Models:
    """The trained copies (UNet, text encoders) and the frozen parts the loop uses."""
    family: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None

    def trained(self) -> dict[str, torch.nn.Module]:
        """{component: module} of the copies that hold a trainable tensor."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: m for k, m in parts.items()
                if m is not None and any(p.requires_grad for p in m.parameters())}


METHOD_CLASSES = {"svdiff": ("svdiff", "SVDiff"), "dreambooth": ("dreambooth", "DreamBooth"),
                  "lora": ("lora", "LoRA"), "textual-inversion": ("textual_inversion", "TextualInversion")}


def _methods() -> dict:
    """{method: its class} (each in its own module of this package)."""
    found = {}
    for method, (module, name) in METHOD_CLASSES.items():
        try:
            found[method] = getattr(importlib.import_module(f".{module}", __package__), name)
        except ModuleNotFoundError:
            continue
    return found


# -- 1. checking inputs ------------------------------------------------------------------

def family(pipe) -> str:
    return backbone(pipe).family


def check_applies(method: str, fam: str) -> None:
    if fam not in APPLIES[method]:
        where = " and ".join(FAMILY_TITLES[f] for f in APPLIES[method])
        raise UserError(f"--method: {method} does not apply to {FAMILY_TITLES.get(fam, fam)} models "
                        f"(it trains on {where})")


def native_resolution(pipe) -> int:
    return int(pipe.vae_scale_factor * pipe.unet.config.sample_size)


def check_resolution(pipe, resolution) -> int:
    if resolution is None:
        return native_resolution(pipe)
    levels = len(pipe.unet.config.block_out_channels) - 1
    multiple = int(pipe.vae_scale_factor * 2 ** levels)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise UserError(f"--resolution: {resolution!r} must be a positive multiple of {multiple} for this model")
    return resolution


def ti_placeholder(tokenizer, phrase: str) -> str:
    """The new token textual inversion learns: the phrase itself, one word that is not
    already a single token of the tokenizer (e.g. `<sks>`, not `sks`)."""
    if len(phrase.split()) != 1:
        raise UserError(f"--phrase: {phrase!r}: textual inversion learns one new token; give a single word "
                        "such as <sks>")
    if phrase in tokenizer.get_vocab() or len(tokenizer.tokenize(phrase)) == 1:
        raise UserError(f"--phrase: {phrase!r} is already a single token of the tokenizer; textual inversion "
                        f"needs a new one, such as <{phrase.strip('<>')}>")
    return phrase


def check_out(out, *, overwrite: bool, resume: bool) -> Path:
    if out is None or str(out).strip() == "":
        raise UserError("--out: give the folder to write the concept to")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a folder")
    if resume:
        if not latest_checkpoint(out):
            raise UserError(f"--resume: {out} holds no checkpoint to resume from")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out: {out} is not empty; choose a new folder or pass --overwrite")
        leftover = sorted(p.name for p in out.iterdir() if p.name not in _written_names())
        if leftover:
            raise UserError(f"--overwrite: {out} also holds {', '.join(leftover[:3])}, which a training run "
                            "does not write; choose a new folder")
    return out


def _written_names() -> set[str]:
    names = {CONCEPT_JSON, REFERENCES, CHECKPOINTS}
    for cls in _methods().values():
        names.update(cls.files)
    return names


def _positive_int(name: str, value, *, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"--{name}: {value!r} must be a whole number > 0")
    return value


def _positive_float(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"--{name}: {value!r} must be a number > 0")
    return float(value)


def _text(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"--{name}: must not be empty")
    return " ".join(value.split())


# -- 2. data -----------------------------------------------------------------------------

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of step `step` (`stream` separates e.g. the probe from the steps)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7 + stream) % (2 ** 63))


@torch.no_grad()
def encode_posteriors(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image; latents are sampled from them each step."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        x = pixels[i:i + batch].to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None)
    return ((z - shift) if shift is not None else z) * vae.config.scaling_factor


@torch.no_grad()
def generate_class_images(pipe, superclass: str, count: int, resolution: int, *, steps: int, seed: int) -> list:
    """`count` images of "a photo of a {superclass}" from the base model (DDIM, `steps`
    steps), for prior preservation; the caller's pipeline is not changed."""

    gen = type(pipe).from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    gen.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, count, 4):
        n = min(4, count - i)
        generator = torch.Generator().manual_seed(seed + 10_000 + i)
        images += gen(f"a photo of a {superclass}", num_images_per_prompt=n, num_inference_steps=steps,
                      height=resolution, width=resolution, generator=generator).images
    return images


# -- 3. models ---------------------------------------------------------------------------

def copy_models(pipe, fam: str, device: torch.device) -> Models:
    """fp32 copies of the UNet and text encoder(s) (frozen until a method unfreezes), the
    pipeline's own VAE, and the noise schedule of the pipeline's scheduler."""

    def trainable_copy(module):
        if module is None:
            return None
        clone = copy.deepcopy(module).to(device)
        if clone.dtype != torch.float32:
            clone.to(dtype=torch.float32)
        clone.requires_grad_(False)
        clone.train()
        return clone

    return Models(
        family=fam, unet=trainable_copy(pipe.unet), text_encoder=trainable_copy(pipe.text_encoder),
        tokenizer=copy.deepcopy(pipe.tokenizer), vae=pipe.vae, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        text_encoder_2=trainable_copy(getattr(pipe, "text_encoder_2", None)),
        tokenizer_2=copy.deepcopy(getattr(pipe, "tokenizer_2", None)),
    )


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class Conditioner:
    """The UNet's conditioning for a list of prompts (SD: the last hidden state; SD-XL:
    both encoders' penultimate states, the pooled embedding and the size ids). Prompts
    through a frozen text encoder are encoded once."""

    def __init__(self, models: Models, resolution: int, device: torch.device):
        self.m, self.resolution, self.device = models, resolution, device
        trained = models.trained()
        self.frozen = "text_encoder" not in trained and "text_encoder_2" not in trained
        self.cache: dict[str, tuple] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        if not self.frozen:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                embeds, added = self._encode(missing)
            for i, p in enumerate(missing):
                self.cache[p] = (embeds[i], None if added is None else {k: v[i] for k, v in added.items()})
        rows = [self.cache[p] for p in prompts]
        embeds = torch.stack([r[0] for r in rows])
        added = None if rows[0][1] is None else {k: torch.stack([r[1][k] for r in rows]) for k in rows[0][1]}
        return embeds, added

    def _encode(self, prompts: list[str]):
        m = self.m
        ids = token_ids(m.tokenizer, prompts).to(self.device)
        if m.family != "sdxl":
            return m.text_encoder(ids)[0], None
        first = m.text_encoder(ids, output_hidden_states=True)
        second = m.text_encoder_2(token_ids(m.tokenizer_2, prompts).to(self.device), output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts), dtype=embeds.dtype, device=self.device)
        return embeds, {"text_embeds": second[0], "time_ids": time_ids}


# -- 4. the objective --------------------------------------------------------------------

def diffusion_loss(models: Models, cond: Conditioner, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, prompts: list[str], *, split: int | None = None,
                   prior_weight: float = 1.0) -> torch.Tensor:
    """MSE between the UNet's prediction and its target on noised latents; with `split`,
    rows from `split` on are class images whose loss is added with `prior_weight`."""
    sched = models.noise_scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise UserError(f"--model: unknown prediction type {kind!r} in the scheduler config")
    embeds, added = cond(prompts)
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    pred = models.unet(noisy, timesteps, encoder_hidden_states=embeds, **kwargs).sample
    if split is None:
        return F.mse_loss(pred.float(), target.float())
    return (F.mse_loss(pred[:split].float(), target[:split].float())
            + prior_weight * F.mse_loss(pred[split:].float(), target[split:].float()))


# -- 5. checkpoints ----------------------------------------------------------------------

def latest_checkpoint(out: Path) -> Path | None:
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def trainable_state(models: Models) -> dict[str, torch.Tensor]:
    return {f"{component}.{name}": p.detach().cpu().contiguous()
            for component, module in models.trained().items()
            for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(models: Models, state: dict[str, torch.Tensor], where: Path) -> None:
    params = {f"{c}.{n}": p for c, m in models.trained().items() for n, p in m.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise UserError(f"--resume: {where} was written by a different run (its trained tensors differ)")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


def save_checkpoint(out: Path, step: int, models: Models, optimizer, method, record: dict) -> Path:
    """checkpoint-<step>/: the trained tensors, the optimizer state, the run record and the
    concept files themselves (so a checkpoint also loads with --concept)."""

    folder = out / CHECKPOINTS / f"checkpoint-{step}"
    tmp = out / CHECKPOINTS / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(models), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if getattr(method, "saves_in_checkpoints", True):
        method.save(tmp)
    (tmp / "state.json").write_text(json.dumps(dict(record, step=step), indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# -- 6. the record -----------------------------------------------------------------------

def weights_hash(pipe) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the base model's weights."""
    h = hashlib.sha256()
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            h.update(f"{component}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_model_name(pipe, base_model) -> str | None:
    if base_model:
        return str(base_model)
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return str(name) if name else None


def write_references(out: Path, images: list, references) -> list[str]:
    folder = out / REFERENCES
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    if references is None:
        for i, image in enumerate(images):
            path = folder / f"reference_{i}.png"
            image.save(path)
            paths.append(path)
    else:
        for i, src in enumerate(references):
            src = Path(src)
            path = folder / (src.name if src.name not in {p.name for p in paths} else f"{i}_{src.name}")
            shutil.copyfile(src, path)
            paths.append(path)
    return [str(p.relative_to(out)) for p in paths]


def clear_outputs(out: Path) -> None:
    """--overwrite: remove what a training run writes (and nothing else)."""
    names = _written_names()
    leftover = sorted(p.name for p in out.iterdir() if p.name not in names)
    if leftover:
        raise UserError(f"--overwrite: {out} also holds {', '.join(leftover[:3])}, which a training run "
                        "does not write; choose a new folder")
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# -- 7. the loop -------------------------------------------------------------------------

def train_concept(pipe, images, *, phrase: str, superclass: str, method: str = "svdiff", out,
                  steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
                  train_text_encoder: bool | None = None, prior_preservation: bool = False,
                  class_images: int = 0, prior_weight: float = 1.0, class_image_steps: int = 25,
                  resolution: int | None = None, seed: int = 0, checkpoint_every: int | None = None,
                  resume: bool = False, overwrite: bool = False, progress=None, stop=None,
                  references=None, mixed_precision: str | None = None, gradient_checkpointing: bool = False,
                  base_model: str | None = None, recipe: Recipe | None = None) -> dict:
    """Train a concept from `images` and write it to `out` (see the module docstring).

    Returns the summary also written to `out/concept.json`: method, steps, seconds,
    final_loss (mean of the last 10 steps' losses), probe_loss_start / probe_loss_end
    (the loss on a fixed probe: the first photos at fixed timesteps and noise), out,
    stopped, and the run's record (phrase, superclass, hyperparameters, base model).
    `progress(dict(step, steps, loss, steps_per_s, eta_s))` is called after every step;
    when `stop` (a threading.Event) is set, a checkpoint is saved, the concept is written
    from the current weights and the summary says stopped=True.
    """
    started = time.perf_counter()
    # 1. check everything before anything is written
    base = recipe if recipe is not None else default_recipe(method)
    method = base.method
    phrase, superclass = _text("phrase", phrase), _text("superclass", superclass)
    fam = family(pipe)
    check_applies(method, fam)
    images = check_images(images)
    _positive_int("steps", steps)
    _positive_int("batch-size", batch_size)
    _positive_int("checkpoint-every", checkpoint_every)
    _positive_float("lr", lr)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed: {seed!r} must be a whole number >= 0")
    if train_text_encoder is not None and not isinstance(train_text_encoder, bool):
        raise UserError(f"--text-encoder: {train_text_encoder!r} must be true or false")
    try:
        rec = base.replace(steps=steps, lr=lr, batch_size=batch_size, train_text_encoder=train_text_encoder,
                           checkpoint_every=checkpoint_every)
    except ValueError as e:
        raise UserError(f"--{method}: {e}") from None
    if prior_preservation:
        _positive_int("class-images", class_images, allow_none=False)
        _positive_int("class-image-steps", class_image_steps, allow_none=False)
        if not isinstance(prior_weight, (int, float)) or not math.isfinite(prior_weight) or prior_weight < 0:
            raise UserError(f"--prior-weight: {prior_weight!r} must be a number >= 0")
    res = check_resolution(pipe, resolution)
    if mixed_precision is None:
        mixed_precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(pipe.unet.dtype, "no")
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed-precision: {mixed_precision!r} is not one of {' | '.join(MIXED_PRECISION)}")
    device = pipe.unet.device
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("--dtype: float16 training needs a GPU; use float32 or bfloat16 on the CPU")
    placeholder = ti_placeholder(pipe.tokenizer, phrase) if method == "textual-inversion" else None
    if references is not None:
        references = [Path(r).expanduser() for r in references]
        for r in references:
            if not r.is_file():
                raise UserError(f"references: {r} is not a file")
    if stop is not None and not hasattr(stop, "is_set"):
        raise UserError("stop: expected a threading.Event")
    out = check_out(out, overwrite=overwrite, resume=resume)
    resume_from = latest_checkpoint(out) if resume else None
    record_in = json.loads((resume_from / "state.json").read_text()) if resume_from else None
    if record_in is not None:
        for key, want in (("method", method), ("seed", seed), ("phrase", phrase), ("resolution", res),
                          ("hyperparameters", _same_run(rec))):
            got = record_in.get(key)
            if key == "hyperparameters":
                got = {k: v for k, v in (got or {}).items() if k not in ("steps", "checkpoint_every")}
            if got != want:
                raise UserError(f"--resume: {resume_from} was trained with {key}={got!r}, "
                                f"this run asks for {want!r}")

    # 2. data: photos -> posteriors (the VAE is frozen, so each photo is encoded once)
    pixels = torch.stack([to_tensor(im, res, crop=rec.crop, interpolation=rec.interpolation) for im in images])
    flipped = torch.flip(pixels, dims=[-1]) if rec.flip > 0 else None
    mean, std = encode_posteriors(pipe.vae, pixels)
    flip_mean, flip_std = encode_posteriors(pipe.vae, flipped) if flipped is not None else (None, None)
    class_post = None
    if prior_preservation:
        generated = generate_class_images(pipe, superclass, class_images, res, steps=class_image_steps, seed=seed)
        class_pixels = torch.stack([to_tensor(im, res, crop="center", interpolation=rec.interpolation)
                                    for im in generated])
        class_post = encode_posteriors(pipe.vae, class_pixels)

    # 3. models: copies of UNet / text encoder(s); the method picks what trains
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    device = accelerator.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)   # LoRA's random init, reproducibly
        models = copy_models(pipe, fam, device)
        trainer = _methods()[method](models, rec, placeholder=placeholder, superclass=superclass, seed=seed)
    if gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for name in ("text_encoder", "text_encoder_2"):
            if name in models.trained():
                getattr(models, name).gradient_checkpointing_enable()
    cond = Conditioner(models, res, device)
    instance_prompts = [t.format(placeholder or phrase) for t in rec.prompts]
    class_prompt = f"a photo of a {superclass}"
    groups = [g for g in trainer.param_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=rec.betas, eps=rec.eps, weight_decay=rec.weight_decay)
    prepared = accelerator.prepare(*models.trained().values(), optimizer)
    optimizer = prepared[-1]
    params = [p for g in groups for p in g["params"]]

    record = dict(method=method, phrase=phrase, superclass=superclass, prompt=instance_prompts[0],
                  placeholder=placeholder, seed=seed, resolution=res, hyperparameters=_comparable(rec),
                  prior_preservation=bool(prior_preservation), class_images=class_images if prior_preservation else 0,
                  prior_weight=prior_weight if prior_preservation else None, mixed_precision=mixed_precision)

    def sample_latents(g, idx, flips, post, flip_post):
        m, s = post
        if flip_post is not None and flips is not None:
            m = torch.where(flips[:, None, None, None], flip_post[0][idx], m[idx])
            s = torch.where(flips[:, None, None, None], flip_post[1][idx], s[idx])
        else:
            m, s = m[idx], s[idx]
        return scale_latents(pipe.vae, m + s * torch.randn(m.shape, generator=g))

    def probe_loss() -> float:
        """The loss on fixed (photo, timestep, noise) triples, without flips."""
        g = step_generator(seed, 0, stream=1)
        n = min(PROBE_IMAGES, len(images))
        idx = torch.arange(n).repeat_interleave(len(PROBE_TIMESTEPS))
        t = torch.tensor([int(f * models.noise_scheduler.config.num_train_timesteps) for f in PROBE_TIMESTEPS] * n)
        z = sample_latents(g, idx, None, (mean, std), None)
        noise = torch.randn(z.shape, generator=g)
        losses = []
        # parametrize.cached: shifted weights (SVDiff) are computed once for the whole probe
        with torch.no_grad(), accelerator.autocast(), parametrize.cached():
            for i in range(0, len(idx), PROBE_BATCH):
                rows = slice(i, i + PROBE_BATCH)
                n_rows = len(idx[rows])
                losses.append(diffusion_loss(models, cond, z[rows].to(device), noise[rows].to(device),
                                             t[rows].to(device), [instance_prompts[0]] * n_rows).item() * n_rows)
        return float(sum(losses) / len(idx))

    # 4. resume
    start, losses, seconds_before = 0, [], 0.0
    if resume_from is not None:
        from safetensors.torch import load_file
        load_trainable_state(models, load_file(str(resume_from / "trainable.safetensors")), resume_from)
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location="cpu", weights_only=True))
        start = int(record_in["step"])
        losses = list(record_in.get("losses", []))
        seconds_before = float(record_in.get("seconds", 0.0))
        probe_start = record_in["probe_loss_start"]
        if start > rec.steps:
            raise UserError(f"--resume: {resume_from} is past the requested {rec.steps} steps")
    else:
        if overwrite and out.exists():
            clear_outputs(out)
        probe_start = probe_loss()

    # 5. the loop
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    stopped = False
    loop_start = time.perf_counter()
    step = start
    while step < rec.steps:
        if stop is not None and stop.is_set():
            stopped = True
            break
        g = step_generator(seed, step, stream=2 + accelerator.process_index)
        b = rec.batch_size
        idx = torch.randint(len(images), (b,), generator=g)
        flips = torch.rand(b, generator=g) < rec.flip if flipped is not None else None
        templates = torch.randint(len(instance_prompts), (b,), generator=g)
        prompts = [instance_prompts[i] for i in templates.tolist()]
        z = sample_latents(g, idx, flips, (mean, std), (flip_mean, flip_std) if flipped is not None else None)
        split = None
        if class_post is not None:
            cidx = torch.randint(len(class_post[0]), (b,), generator=g)
            z = torch.cat([z, sample_latents(g, cidx, None, class_post, None)])
            prompts += [class_prompt] * b
            split = b
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(models.noise_scheduler.config.num_train_timesteps, (len(z),), generator=g)
        with accelerator.autocast(), parametrize.cached():
            loss = diffusion_loss(models, cond, z.to(device), noise.to(device), t.to(device), prompts,
                                  split=split, prior_weight=prior_weight)
        accelerator.backward(loss)
        if rec.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, rec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.after_step()
        step += 1
        losses.append(float(loss.detach().item()))
        elapsed = time.perf_counter() - loop_start
        rate = (step - start) / elapsed if elapsed > 0 else float("nan")
        if progress is not None:
            progress(dict(step=step, steps=rec.steps, loss=losses[-1], steps_per_s=rate,
                          eta_s=(rec.steps - step) / rate if rate and rate > 0 else float("nan")))
        if step % rec.checkpoint_every == 0 and step < rec.steps and accelerator.is_main_process:
            save_checkpoint(out, step, models, optimizer, trainer,
                            dict(record, losses=losses, probe_loss_start=probe_start,
                                 seconds=seconds_before + time.perf_counter() - started))
    if stopped and step > start and accelerator.is_main_process:
        save_checkpoint(out, step, models, optimizer, trainer,
                        dict(record, losses=losses, probe_loss_start=probe_start,
                             seconds=seconds_before + time.perf_counter() - started))

    # 6. write the concept
    probe_end = probe_loss()
    seconds = seconds_before + time.perf_counter() - started
    tail = losses[-10:]
    summary = dict(record, steps=step, steps_planned=rec.steps, seconds=round(seconds, 3),
                   final_loss=float(sum(tail) / len(tail)) if tail else None,
                   probe_loss_start=probe_start, probe_loss_end=probe_end, out=str(out), stopped=stopped)
    if accelerator.is_main_process:
        files = trainer.save(out)
        refs = write_references(out, images, references)
        concept = dict(summary, references=refs, files=files, format=trainer.format,
                       base_model=dict(name=base_model_name(pipe, base_model), sha256=weights_hash(pipe)),
                       recipe_source=rec.source)
        concept.pop("out")
        if placeholder:
            concept["token"] = placeholder
        (out / CONCEPT_JSON).write_text(json.dumps(concept, indent=2) + "\n")
        summary.update(references=refs, files=files, base_model=concept["base_model"])
    accelerator.free_memory()
    return summary


def _comparable(rec: Recipe) -> dict:
    """The recipe as JSON would give it back (tuples as lists)."""
    return json.loads(json.dumps(rec.as_dict()))


def _same_run(rec: Recipe) -> dict:
    """What a resumed run must share with the checkpoint (it may run longer)."""
    return {k: v for k, v in _comparable(rec).items() if k not in ("steps", "checkpoint_every")}
