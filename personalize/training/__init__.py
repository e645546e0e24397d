"""Training concepts from a few photos: SVDiff (arXiv 2303.11305), DreamBooth (arXiv
2208.12242), LoRA (arXiv 2106.09685) and textual inversion (arXiv 2208.01618), through one
loop (`loop.train_concept`); each method's recipe is data (`recipes.RECIPES`)."""

from .loop import train_concept
from .recipes import METHODS, RECIPES, Recipe, recipe

__all__ = ["train_concept", "METHODS", "RECIPES", "Recipe", "recipe"]
