"""Textual inversion (arXiv 2208.01618) as the study's baseline trains it: one new token
(the phrase, e.g. `<sks>`), its embedding initialised from the superclass and the only
trained tensor. The new row is a parametrization of the (copied) embedding matrix, so no
other row can move. Saved as diffusers' `learned_embeds.safetensors` ({token: (1, d)}),
loadable by `pipe.load_textual_inversion(folder)`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

FILE = "learned_embeds.safetensors"


class NewRows(nn.Module):
    """Appends trainable rows to an embedding matrix: W -> [W; rows]."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = nn.Parameter(rows.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, self.rows.to(weight.dtype)])


class TextualInversion:
    format = "textual_inversion"
    files = (FILE,)

    def __init__(self, models, recipe, *, placeholder: str, superclass: str, **_):
        self.models, self.recipe, self.token = models, recipe, placeholder
        tokenizer, encoder = models.tokenizer, models.text_encoder
        embedding = encoder.get_input_embeddings()
        vocab = embedding.weight.shape[0]
        if tokenizer.add_tokens(placeholder) != 1 or tokenizer.convert_tokens_to_ids(placeholder) != vocab:
            from ..errors import UserError
            raise UserError(f"--phrase: {placeholder!r} could not be added as one new token")
        init_ids = tokenizer(superclass, add_special_tokens=False).input_ids
        with torch.no_grad():
            init = embedding.weight[init_ids].float().mean(0, keepdim=True)
        self.new_rows = NewRows(init)
        parametrize.register_parametrization(embedding, "weight", self.new_rows, unsafe=True)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.new_rows.rows], "lr": self.recipe.lr}]

    def after_step(self) -> None:
        pass

    def save(self, folder: Path) -> list[str]:
        save_file({self.token: self.new_rows.rows.detach().float().cpu().contiguous()}, str(folder / FILE),
                  metadata={"format": "pt"})
        return [FILE]
