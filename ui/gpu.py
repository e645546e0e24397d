"""The GPU decorator of Hugging Face ZeroGPU Spaces where that package is installed,
and nothing elsewhere, so the app runs unchanged locally."""

try:  # pragma: no cover - only on Spaces
    import spaces

    gpu = spaces.GPU(duration=120)
    ZERO_GPU = True
except ImportError:
    ZERO_GPU = False

    def gpu(fn):
        return fn
