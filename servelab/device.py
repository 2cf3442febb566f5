"""The one place that decides what hardware servelab runs on.

Lab code never branches on hardware: it asks this module for the torch device, the Triton module
(compiled on CUDA, the interpreter on CPU) and the torch.distributed backend (NCCL or gloo).

Triton reads ``TRITON_INTERPRET`` when it is imported, so ``configure_triton_env()`` runs when
``servelab`` is imported and ``import_triton()`` refuses to hand out a Triton that was imported
before servelab in the wrong mode (the notebook mistake this guards against).
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

DEVICE_ENV = "SERVELAB_DEVICE"  # "auto" (default), "cpu" or "cuda"


class DeviceError(RuntimeError):
    """Asked for hardware this machine does not have, or Triton imported in the wrong mode."""


def cuda_available() -> bool:
    """Whether this machine has a CUDA GPU, asked without initialising the CUDA driver in this process.

    ``torch.cuda.is_available()`` calls cudaGetDeviceCount, which initialises the driver (cuInit), and then no
    process forked from this one can use the GPU: lab 04 forks its ranks. ``torch.cuda.device_count()`` asks
    NVML instead until CUDA is in use (it falls back to the CUDA runtime where NVML is missing)."""
    return torch.cuda.device_count() > 0


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA: torch has (a model or tensor went to the GPU), or anything
    has initialised the CUDA driver (``torch.cuda.is_available()``, another library). Children forked from
    such a process cannot use the GPU."""
    return torch.cuda.is_initialized() or _cuda_driver_initialized()


def _cuda_driver_initialized() -> bool:
    if torch.version.cuda is None:  # a CPU build of torch
        return False
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver on this machine
        return False
    count = ctypes.c_int()
    # every driver call returns CUDA_ERROR_NOT_INITIALIZED (3) before cuInit; 0 (success) means after it
    return libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0


def get_device(request: str | torch.device | None = None) -> torch.device:
    """Resolve "auto" | "cpu" | "cuda" (default: $SERVELAB_DEVICE, else auto) to a torch.device."""
    if isinstance(request, torch.device):
        request = str(request)
    request = (request or os.environ.get(DEVICE_ENV) or "auto").lower()
    if request == "auto":
        return _indexed(torch.device("cuda" if cuda_available() else "cpu"))
    if request == "cpu":
        return torch.device("cpu")
    if request.startswith("cuda"):
        if not cuda_available():
            raise DeviceError(
                f"device {request!r} was requested but this machine has no CUDA GPU "
                f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}). "
                f"Use the CPU (--device cpu, device='cpu', or {DEVICE_ENV}=cpu) or 'auto'."
            )
        return _indexed(torch.device(request))
    raise DeviceError(f"unknown device {request!r}: use 'auto', 'cpu' or 'cuda'")


def _indexed(dev: torch.device) -> torch.device:
    """'cuda' -> 'cuda:0' (the current GPU): tensors report their device with its index, so compare like that.
    Until CUDA is in use the current GPU is 0; asking torch would initialise CUDA (see cuda_available)."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return dev


def preferred_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """Weights dtype for a model built from scratch (the timing presets): bf16 on a GPU, where serving runs in
    half precision and its tensor cores expect it; float32 on CPU, where bf16 matmuls are slow or emulated."""
    return torch.bfloat16 if get_device(device).type == "cuda" else torch.float32


def device_class(device: str | torch.device | None = None) -> str:
    """Key for per-hardware thresholds: 'cpu', 'h200', 'h100', 'a100', 'l4', ... or 'unknown-gpu'."""
    dev = get_device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10g", "4090", "t4"):
        if key in name:
            return key
    return "unknown-gpu"


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for the GPU's queued work. A process that never used CUDA has none, and must not initialise it
    here: it could no longer fork processes that use the GPU (lab 04's ranks)."""
    dev = get_device(device)
    if dev.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.synchronize(dev)


def pinned_memory_available() -> bool:
    """Page-locked host memory needs a CUDA driver; a copy from it can run while the host goes on."""
    return cuda_available()


def host_to_device(tensors: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor]:
    """Move host LongTensors to ``device`` in ONE copy: pack them into one buffer, copy it, split it there.

    Used once per engine step for everything the step's layers need. On a GPU the buffer is pinned and the
    copy is asynchronous, so the host never waits for the GPU here. Tensors already on ``device`` (and
    everything, when ``device`` is the CPU) come back unchanged.
    """
    device = _indexed(torch.device(device))
    if device.type == "cpu":
        return list(tensors)
    host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    bad = [f"{tuple(t.shape)} {t.dtype} on {t.device}" for i, t in enumerate(tensors)
           if (i in host and t.dtype != torch.long) or (i not in host and t.device != device)]
    if bad:
        raise ValueError(f"host_to_device moves host LongTensors to {device}; got {bad}: build step inputs on the "
                         "CPU with dtype=torch.long (the model moves them to its device once per step)")
    out = list(tensors)
    if not host:
        return out
    flat = torch.cat([tensors[i].reshape(-1) for i in host])
    if pinned_memory_available():
        flat = flat.pin_memory()  # from PyTorch's caching host allocator: cheap after the first steps
    flat = flat.to(device, non_blocking=True)
    start = 0
    for i in host:
        n = tensors[i].numel()
        out[i] = flat[start:start + n].view(tensors[i].shape)
        start += n
    return out


PAGED_BACKEND_ENV = "SERVELAB_PAGED_BACKEND"  # "torch" or "triton"; unset: decided by paged_backend()
PAGED_BACKENDS = ("torch", "triton")


def paged_backend(device: str | torch.device | None = None) -> str:
    """Attention backend of the paged KV cache (lab 02): $SERVELAB_PAGED_BACKEND when set, else "triton"
    (the lab's kernels) on CUDA and "torch" (plain PyTorch) on CPU. ``device``: where the cache lives
    (default: whether this machine has a CUDA GPU). Forcing "triton" on a CPU runs the kernels in Triton's
    interpreter: slow, but it checks them."""
    forced = os.environ.get(PAGED_BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in PAGED_BACKENDS:
            raise DeviceError(f"${PAGED_BACKEND_ENV}={forced!r} is not a paged-attention backend: "
                              f"use one of {', '.join(PAGED_BACKENDS)} (or unset it)")
        return forced
    on_cuda = cuda_available() if device is None else torch.device(device).type == "cuda"
    return "triton" if on_cuda else "torch"


CUDA_GRAPHS_ENV = "SERVELAB_CUDA_GRAPHS"  # "1": record CUDA graphs (servelab.graphs) on a GPU


def graph_backend(device: str | torch.device | None = None) -> str:
    """How ``servelab.graphs`` replays a decode step: "cuda" (a recorded CUDA graph) on a CUDA device where
    ``$SERVELAB_CUDA_GRAPHS=1``, else "eager" (the same fixed-shape step, called again).

    Recording is opt-in until a GPU run clears it: on the first H200 run (2026-11-30) the captured step matched
    eager exactly, but later replays gave logits up to 0.6 away from eager (fp32) and greedy tokens diverged
    after about 40 steps; the cause is not found yet (``tests/test_graphs.py``'s GPU test shows it)."""
    dev = get_device(device) if device is None else torch.device(device)
    return "cuda" if dev.type == "cuda" and os.environ.get(CUDA_GRAPHS_ENV) == "1" else "eager"


def dist_backend() -> str:
    """torch.distributed backend for the disaggregation lab: NCCL between GPUs, gloo on CPU."""
    return "nccl" if cuda_available() and torch.distributed.is_nccl_available() else "gloo"


def rank_devices(world_size: int, request: str | torch.device | None = None) -> list[torch.device]:
    """Each rank's device for the disaggregation lab (``get_device(request)`` decides CPU or CUDA): one GPU
    per rank when the machine has enough, else every rank on the same GPU (a shared card)."""
    base = get_device(request)
    if base.type != "cuda":
        return [base] * world_size
    if torch.cuda.device_count() >= world_size:
        return [torch.device("cuda", r) for r in range(world_size)]
    return [base] * world_size


def ranks_backend(devices: list[torch.device]) -> str:
    """torch.distributed backend between ranks on ``devices``: ``dist_backend()`` when every rank has a GPU
    of its own, gloo otherwise (CPU ranks; or ranks sharing one GPU, which NCCL refuses to connect)."""
    own_gpus = all(d.type == "cuda" for d in devices) and len(set(devices)) == len(devices)
    return dist_backend() if own_gpus else "gloo"


# ----------------------------------------------------------------------------- Triton
def wants_interpreter() -> bool:
    return not cuda_available()


def configure_triton_env() -> None:
    """Set TRITON_INTERPRET=1 on machines without CUDA, before anything imports triton."""
    if wants_interpreter() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_mode() -> str:
    """'compiled' (CUDA), 'interpreter' (CPU, TRITON_INTERPRET=1) or 'missing'."""
    if not triton_installed():
        return "missing"
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"


def import_triton() -> ModuleType:
    """Return the ``triton`` module in the right mode for this machine, or explain how to fix it."""
    if not triton_installed():
        raise DeviceError("triton is not installed: `pip install triton` (Linux) to run the kernel labs")
    if wants_interpreter() and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError(
            "this machine has no CUDA GPU, so Triton must run in its interpreter, but triton was "
            "imported before servelab and without TRITON_INTERPRET=1. Restart the kernel and run "
            "`import servelab` before any `import triton` (or set TRITON_INTERPRET=1 first)."
        )
    configure_triton_env()
    return importlib.import_module("triton")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def device_choice(request: str | torch.device | None = None) -> tuple[torch.device, str]:
    """The device the labs will use (``get_device(request)``) and why: the request, else $SERVELAB_DEVICE, else
    what "auto" found. An impossible $SERVELAB_DEVICE raises get_device's DeviceError, saying it came from there."""
    env = os.environ.get(DEVICE_ENV)
    source = "requested" if request else f"${DEVICE_ENV}={env}" if env else f"no ${DEVICE_ENV}"
    try:
        dev = get_device(request)
    except DeviceError as err:
        if request:
            raise
        raise DeviceError(f"{source}: {err}") from None  # the setting to fix, first
    if str(request or env or "auto").lower() == "auto":
        return dev, f"auto ({source}): " + ("a CUDA GPU here" if dev.type == "cuda" else "no CUDA GPU here")
    return dev, f"requested {str(request)!r}" if request else source


def describe(device: str | torch.device | None = None) -> dict:
    """What this machine has and the device the labs will use on it (``device``, else $SERVELAB_DEVICE, else
    auto), for `servelab doctor`, notebook setup cells and grader reports."""
    dev, why = device_choice(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "device_choice": why,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "device_class": device_class(dev),
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if dev.type == "cuda" else 0,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "triton_mode": triton_mode(),
        "dist_backend": dist_backend(),
    }
    if triton_installed():
        from importlib.metadata import version

        info["triton"] = version("triton")
    return info


LAB_NEEDS = {
    # lab -> (what it needs, what runs without it)
    "00_warmup": "cpu",
    "01_batching": "cpu",
    "02_paged_attention": "triton",
    "03_speculative": "cpu",
    "04_disaggregation": "two_workers",
}
LABS_DIR = Path(__file__).resolve().parents[1] / "labs"  # the learner notebooks, in a checkout of the repo
NOT_BUILT = "not built yet"


def lab_support(info: dict | None = None, labs_dir: Path | None = None) -> dict[str, str]:
    """For each lab: 'full', 'interpreter' (kernels in Triton's slow interpreter), 'blocked', or 'not built
    yet' while the repository has no ``labs/<lab>`` folder (it flips by itself when the lab lands). Without
    any labs folder (servelab installed on its own) every lab reports what this machine could do."""
    info = info or describe()
    labs_dir = LABS_DIR if labs_dir is None else labs_dir
    out = {}
    for lab, need in LAB_NEEDS.items():
        if labs_dir.is_dir() and not (labs_dir / lab).is_dir():
            out[lab] = NOT_BUILT
        elif need == "triton":
            mode = info["triton_mode"]
            out[lab] = {"compiled": "full", "interpreter": "interpreter"}.get(mode, "blocked")
        elif need == "two_workers":
            out[lab] = "full" if info["gpus"] >= 2 else "full (gloo, CPU processes)"
        else:
            out[lab] = "full"
    return out
