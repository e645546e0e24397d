"""Fine-tuned concepts: format detection, and applying or removing a concept in place."""

from personalize.concepts.apply import AppliedConcept, apply_concept
from personalize.concepts.files import FORMATS, detect_format
from personalize.concepts.svdiff import spectral_weight

__all__ = ["FORMATS", "AppliedConcept", "apply_concept", "detect_format", "spectral_weight"]
