"""Where the denoiser runs: PyTorch (eager), or ONNX Runtime on the CPU.

A small denoiser on a CPU spends most of a call in PyTorch's per-operator dispatch, not in
arithmetic: the world's 1.5 M-parameter UNet takes about 26 ms for the three rows of one
mixed-sampling step in eager mode and about 13 ms as an ONNX Runtime graph (fused
operators, one call), the same predictions to about 1e-5. At a sweep's batches of a few
hundred rows the arithmetic weighs more and the gain falls to 1.06 to 1.3x (more with one
thread per process). A large model (Stable Diffusion's 866 M parameters) is all arithmetic
and its graph would pass protobuf's 2 GB limit, so only denoisers up to `MAX_PARAMETERS`
run here.

`onnx` runs the denoiser of an SD 1.x/2.x pipeline, float32, on the CPU, as a graph
exported from the module as it is at the start of a run (a concept applied, LoRA layers,
Custom Diffusion processors included). A run whose plan reaches into attention (masked
sampling, Photoswap) runs in PyTorch: its processors are Python. The graph is exported
again whenever what it was traced from changed (`fingerprint`: the tensors, the modules'
plain settings such as LoRA scales and switches, the attention processors), so applying
or removing a concept, or switching an adapter off, does not run a stale graph; forward
hooks are not part of a graph. The last few graphs of each denoiser are kept, so that an
app switching between concepts does not export on every run.
"""

from __future__ import annotations

import io
import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from personalize.errors import UserError

RUNTIMES = ("torch", "onnx", "auto")
ONNX_OPSET = 18
MAX_PARAMETERS = 100_000_000   # onnx runs denoisers up to this size (`auto` leaves larger ones in PyTorch)
KEEP = 4                       # graphs kept per denoiser (weights x latent size), latest first

# denoiser -> OrderedDict {(fingerprint, latent size): OnnxDenoiser}, least recently used first.
_EXPORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EXPORTS_LOCK = threading.Lock()  # runs come from the app's worker threads


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_runtime(runtime: str, device: str, dtype: str) -> None:
    """`runtime` is one of RUNTIMES, and `onnx` is asked for only where it can run."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime: {runtime!r} is not one of {' | '.join(RUNTIMES)}")
    if runtime != "onnx":
        return
    if device != "cpu" or dtype != "float32":
        raise UserError(f"--runtime onnx: runs on the CPU in float32 only (this run: {device}, {dtype}); "
                        "use --runtime torch")
    if not onnx_available():
        raise UserError("--runtime onnx: the onnxruntime package is not installed (pip install onnxruntime onnx)")


def resolve_runtime(runtime: str, device: str, dtype: str, family: str = "sd", parameters: int = 0) -> str:
    """"torch" or "onnx": `auto` is onnx for an SD 1.x/2.x denoiser of at most
    MAX_PARAMETERS `parameters` on the CPU in float32 when onnxruntime is installed, else
    torch; an explicit `onnx` anywhere else is an error."""
    if runtime == "auto":
        ok = (family == "sd" and device == "cpu" and dtype == "float32" and parameters <= MAX_PARAMETERS
              and onnx_available())
        return "onnx" if ok else "torch"
    check_runtime(runtime, device, dtype)
    if runtime == "onnx" and family != "sd":
        raise UserError(f"--runtime onnx: runs the UNet of SD 1.x/2.x pipelines only, this one is {family!r}; "
                        "use --runtime torch")
    if runtime == "onnx" and parameters > MAX_PARAMETERS:
        raise UserError(f"--runtime onnx: this denoiser has {parameters / 1e6:.0f}M parameters, ONNX Runtime is "
                        f"used for denoisers up to {MAX_PARAMETERS / 1e6:.0f}M (a large one gains little and its "
                        "graph passes protobuf's 2 GB limit); use --runtime torch")
    return runtime


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def denoiser_runner(runtime: str, family: str, denoiser, latent_size: tuple[int, int]):
    """The callable that replaces `denoiser` for a run (`resolve_runtime`), or None to run
    it in PyTorch."""
    device, dtype = denoiser.device.type, str(denoiser.dtype).removeprefix("torch.")
    if resolve_runtime(runtime, device, dtype, family, parameter_count(denoiser)) == "torch":
        return None
    return onnx_denoiser(denoiser, latent_size)


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def _settings(module: torch.nn.Module) -> tuple:
    """A module's own plain attributes (LoRA scales and switches, FreeU factors, flags),
    in a comparable form; its tensors, submodules and hooks are not among them."""
    return tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                        if k not in ("_parameters", "_buffers", "_modules") and "hooks" not in k
                        and _plain(v)))


def fingerprint(module: torch.nn.Module) -> tuple:
    """What the exported graph depends on: every parameter and buffer (name, storage,
    in-place version, shape, dtype and the sum of its values: a concept swaps tensors,
    training edits them in place, and an edit through `.data` or a new tensor in a freed
    tensor's memory shows only in the values), every module's type and plain settings
    (LoRA scales, adapters switched on or off, FreeU factors) and the attention
    processors' types. Once per run: a few milliseconds for the world's denoiser."""
    with torch.no_grad():
        tensors = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype,
                         float(t.detach().sum(dtype=torch.float64)))
                        for name, t in [*module.named_parameters(), *module.named_buffers()])
    modules = tuple((name, type(m).__name__, _settings(m)) for name, m in module.named_modules())
    processors = getattr(module, "attn_processors", {})
    return tensors, modules, tuple((k, type(v).__name__) for k, v in processors.items())


class _UNetGraph(torch.nn.Module):
    """The UNet's call as the engine makes it, with plain tensor inputs and output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.training = unet.training  # the exporter restores the wrapper's mode, recursively, after the trace

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class OnnxDenoiser:
    """An SD UNet exported to ONNX and run by ONNX Runtime's CPU provider, with as many
    threads as torch uses when it is made. `calls` and `rows` count what it has run (the
    benchmark's counts, which a PyTorch forward hook cannot see)."""

    def __init__(self, unet, latent_size: tuple[int, int]):
        import onnxruntime as ort

        config = unet.config
        example = (torch.zeros(2, config.in_channels, *latent_size),
                   torch.tensor(500.0),  # float: some schedulers' timesteps are not whole numbers
                   torch.zeros(2, 77, config.cross_attention_dim))
        graph = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            # in eval mode for the trace only: the module's own mode is part of its fingerprint
            torch.onnx.export(_UNetGraph(unet), example, graph, dynamo=False, opset_version=ONNX_OPSET,
                              training=torch.onnx.TrainingMode.EVAL,
                              input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out"],
                              dynamic_axes={"sample": {0: "rows"},
                                            "encoder_hidden_states": {0: "rows", 1: "tokens"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        self.calls = self.rows = 0

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())  # exact for DDIM's whole numbers
        self.calls, self.rows = self.calls + 1, self.rows + sample.shape[0]
        out = self.session.run(None, {"sample": sample.detach().contiguous().numpy(),
                                      "timestep": t.numpy(),
                                      "encoder_hidden_states": encoder_hidden_states.detach().contiguous().numpy()})
        return torch.from_numpy(out[0])


def onnx_denoiser(unet, latent_size: tuple[int, int]) -> OnnxDenoiser:
    """The ONNX graph of `unet` as its weights are now, for latents of `latent_size`
    (the UNet's Python takes shape-dependent branches, so a graph serves one size): exported
    on first use and again after any change of its weights or processors."""
    size = tuple(int(v) for v in latent_size)
    with _EXPORTS_LOCK:
        key = (fingerprint(unet), size)
        graphs = _EXPORTS.setdefault(unet, OrderedDict())
        if key in graphs:
            graphs.move_to_end(key)
            return graphs[key]
        while len(graphs) >= KEEP:
            graphs.popitem(last=False)  # free the oldest before building a new one
        runner = OnnxDenoiser(unet, size)
        # Weights changed while the graph was traced (another thread applied a concept):
        # the graph serves this run only, never filed under a key it may not match.
        if fingerprint(unet) == key[0]:
            graphs[key] = runner
        return runner
