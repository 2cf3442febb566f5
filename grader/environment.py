"""What this machine can run: the device a grading run uses, and which criteria it must block."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

from grader.spec import Criterion, Lab, UsageError
from grader.thresholds import threshold


@dataclass
class Hardware:
    device: str  # "cpu" | "cuda"
    device_class: str  # key of grader/thresholds.py
    device_name: str
    gpus: int
    triton_mode: str  # "compiled" | "interpreter" | "missing"


def probe(request: str = "auto") -> Hardware:
    """Resolve --device auto|cpu|cuda on this machine (importing torch, not triton)."""
    import torch

    cuda = torch.cuda.is_available()
    request = (request or "auto").lower()
    if request not in ("auto", "cpu") and not request.startswith("cuda"):
        raise UsageError(f"unknown device {request!r} (from --device or $SERVELAB_DEVICE): use auto, cpu or cuda")
    if request.startswith("cuda") and not cuda:
        raise UsageError(f"device {request!r}: this machine has no CUDA GPU (use --device auto or cpu)")
    device = "cuda" if (request.startswith("cuda") or (request == "auto" and cuda)) else "cpu"
    if device == "cpu":
        # Triton kernels then run in its interpreter; it must be chosen before triton is imported
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        name, cls, gpus = _cpu_name(), "cpu", 0
    else:
        from servelab.device import device_class

        name, cls, gpus = torch.cuda.get_device_name(0), device_class("cuda"), torch.cuda.device_count()
    triton = _version("triton")
    mode = (
        "missing"
        if triton is None
        else ("interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled")
    )
    return Hardware(device, cls, name, gpus, mode)


def blocked_reason(lab: Lab, crit: Criterion, hw: Hardware) -> str | None:
    """Why this machine cannot run the criterion (reported as `blocked`, not a zero), else None."""
    if crit.kind == "interpreter" and hw.triton_mode == "missing":
        return "needs Triton (compiled on a GPU, or its interpreter on CPU): `pip install triton` on Linux"
    if crit.kind == "gpu" and hw.device != "cuda":
        return f"needs a CUDA GPU; this run is on {hw.device} ({hw.device_name})"
    if crit.kind == "multi_gpu" and hw.gpus < 2:
        return f"needs 2 or more CUDA GPUs; this machine has {hw.gpus}"
    if crit.kind == "performance" and threshold(hw.device_class, lab.id, crit.id) is None:
        return (
            f"no performance threshold for device class {hw.device_class!r} ({hw.device_name}); "
            "measure one and add it to grader/thresholds.py"
        )
    return None


def vllm_missing(device: str) -> str | None:
    """Why vLLM cannot serve in this grading run (-> `blocked`), or None: it needs the run on a CUDA GPU
    (``device`` is the run's, already checked by ``probe``) and an importable ``vllm``.

    The one place criteria ask "is there CUDA and vLLM", so that a test can fake the answer on a CPU machine.
    """
    if device != "cuda":
        return f"vLLM serves on a CUDA GPU; this run is on {device} (grade with --device cuda on a GPU machine)"
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return (f"vLLM is not installed ({err}): `pip install vllm` (servelab's `gpu` extra: "
                "`pip install -e '.[gpu]'`) on this CUDA machine, then grade again")
    except Exception as err:  # noqa: BLE001 - a broken install (CUDA/torch mismatch) must not read as our error
        return (f"vLLM is installed but fails to import ({type(err).__name__}: {err}): reinstall a vllm "
                "build that matches this machine's torch and CUDA")
    return None


def report_environment(hw: Hardware) -> dict:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - servelab needs torch, but the report must still come out
        torch_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch_version,
        "triton": _version("triton"),
        "servelab": _version("servelab"),
        "interpreter": hw.triton_mode == "interpreter",
        **asdict(hw),
    }


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    from servelab.device import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores)"
