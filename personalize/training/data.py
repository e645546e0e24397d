"""Concept photos: checking them, and turning them into the tensors the loop trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

MAX_IMAGES = 1000


def check_images(images) -> list:
    """The images as RGB PIL images; refuses anything else (one line naming what is wrong)."""

    if isinstance(images, (str, Path)) or not hasattr(images, "__len__"):
        raise UserError("images: expected a list of PIL images")
    if len(images) < 1:
        raise UserError("images: no images given; a concept needs at least one photo")
    if len(images) > MAX_IMAGES:
        raise UserError(f"images: {len(images)} images given; at most {MAX_IMAGES}")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise UserError(f"images: item {i} is a {type(image).__name__}, not a PIL image")
        if min(image.size) < 1:
            raise UserError(f"images: item {i} is empty ({image.size[0]}x{image.size[1]})")
        out.append(image.convert("RGB"))
    return out


def read_image_folder(folder) -> tuple[list, list[Path]]:
    """(RGB images, their paths) of every image file in `folder` (sorted by name). A file
    with an image suffix that does not open as an image, or any other file, is an error."""

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--images: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images: {folder} is empty; put the concept's photos (PNG or JPEG) in it")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--images: {path} is not an image ({first})") from None
    return images, files


def to_tensor(image, resolution: int, *, crop: str, interpolation: str) -> torch.Tensor:
    """(3, R, R) in [-1, 1]. "center": centre-crop to the short side's square, then resize
    (the study's preprocessing); "none": resize the whole image (textual inversion's)."""

    resample = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    if crop == "center":
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), resample=resample)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0
