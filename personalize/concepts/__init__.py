"""Fine-tuned concepts: format detection, and applying or removing a concept in place."""

from personalize.concepts.apply import FORMATS, AppliedConcept, apply_concept, detect_format, spectral_weight

__all__ = ["FORMATS", "AppliedConcept", "apply_concept", "detect_format", "spectral_weight"]
