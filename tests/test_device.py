"""Device selection and the Triton interpreter guard."""
import os
import subprocess
import sys

import pytest
import torch

from servelab import device

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only behaviour")


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_auto_and_cpu(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.get_device("cpu") == torch.device("cpu")
    assert device.get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert device.get_device() == torch.device("cpu")


@needs_cpu_only
def test_cuda_request_on_cpu_machine_is_a_clear_error():
    with pytest.raises(device.DeviceError, match="no CUDA GPU.*device='cpu'"):
        device.get_device("cuda")
    assert device.device_class() == "cpu"
    assert device.dist_backend() == "gloo"


def test_unknown_device_name():
    with pytest.raises(device.DeviceError, match="unknown device"):
        device.get_device("tpu")


def test_describe_reports_lab_support():
    info = device.describe()
    assert {"torch", "device", "triton_mode", "dist_backend"} <= info.keys()
    support = device.lab_support(info)
    assert set(support) == set(device.LAB_NEEDS)
    assert all(v.startswith(("full", "interpreter", "blocked", device.NOT_BUILT)) for v in support.values())
    for lab, mode in support.items():  # this checkout: a lab is built once its labs/ folder exists
        assert (mode == device.NOT_BUILT) == (not (device.LABS_DIR / lab).is_dir()), lab


def test_labs_without_a_folder_are_not_built_yet(tmp_path):
    info = {"triton_mode": "interpreter", "gpus": 0}
    (tmp_path / "00_warmup").mkdir()
    (tmp_path / "02_paged_attention").mkdir()
    support = device.lab_support(info, labs_dir=tmp_path)
    assert support["00_warmup"] == "full" and support["02_paged_attention"] == "interpreter"
    assert support["01_batching"] == support["03_speculative"] == support["04_disaggregation"] == "not built yet"
    (tmp_path / "04_disaggregation").mkdir()  # the lab lands: its mode shows up by itself
    assert device.lab_support(info, labs_dir=tmp_path)["04_disaggregation"] == "full (gloo, CPU processes)"
    # servelab installed without the repository (no labs/ at all): say what the machine could do
    assert "not built yet" not in device.lab_support(info, labs_dir=tmp_path / "nowhere").values()


@needs_cpu_only
def test_importing_servelab_first_puts_triton_in_interpreter_mode():
    code = ("import os, servelab; t = servelab.import_triton(); "
            "print(os.environ.get('TRITON_INTERPRET'), servelab.device.triton_mode())")
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "interpreter"]


@needs_cpu_only
def test_triton_imported_first_is_refused_with_instructions():
    out = run_py("import triton, servelab; servelab.import_triton()")
    assert out.returncode != 0
    assert "import servelab` before any `import triton`" in out.stderr


@needs_cpu_only
def test_a_triton_kernel_runs_in_the_interpreter_on_cpu():
    code = """
import servelab, torch
triton = servelab.import_triton()
import triton.language as tl

@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

x, y = torch.randn(100), torch.randn(100)
out = torch.empty(100)
add[(4,)](x, y, out, 100, BLOCK=32)
assert torch.allclose(out, x + y), (out - x - y).abs().max()
print("ok")
"""
    out = run_py(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_cuda_device_comes_with_its_index(monkeypatch):
    """Tensors on a GPU report cuda:0, never plain 'cuda': get_device resolves the index so comparisons hold
    (a GPU run failed `model.device == get_device()` before). The CUDA probe is faked here."""
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device.get_device("cuda") == torch.device("cuda", 0)
    assert device.get_device("auto") == torch.device("cuda", 0)
    assert device.get_device("cuda:1") == torch.device("cuda", 1)


def test_asking_for_a_gpu_does_not_initialise_cuda(monkeypatch):
    """Lab 04 forks its ranks, and a forked child cannot use a GPU whose driver its parent initialised: so
    cuda_available() counts GPUs through NVML (torch.cuda.device_count) and get_device() says cuda:0 until
    CUDA is in use, never calling what would initialise it. The GPU is faked here."""
    def initialises(*args, **kwargs):
        raise AssertionError("this call initialises the CUDA driver")

    monkeypatch.setattr(torch.cuda, "is_available", initialises)
    monkeypatch.setattr(torch.cuda, "current_device", initialises)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.cuda_available()
    assert device.get_device() == torch.device("cuda", 0)
    assert device.rank_devices(2) == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_cuda_initialized_probe(monkeypatch):
    if not torch.cuda.is_available():
        assert not device.cuda_initialized()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert device.cuda_initialized()


def test_device_choice_says_why(monkeypatch):
    """What doctor and the tour report: the device the labs will use and where that choice came from."""
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.device_choice()[1].startswith("auto (no $SERVELAB_DEVICE)")
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert device.device_choice() == (torch.device("cpu"), "$SERVELAB_DEVICE=cpu")
    monkeypatch.setenv(device.DEVICE_ENV, "tpu")
    assert device.device_choice("cpu") == (torch.device("cpu"), "requested 'cpu'")  # an argument wins
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    assert device.device_choice() == (torch.device("cuda", 0), "auto ($SERVELAB_DEVICE=auto): a CUDA GPU here")


@pytest.mark.parametrize("setting", ["tpu", pytest.param("cuda", marks=needs_cpu_only)])
def test_describe_follows_servelab_device(monkeypatch, setting):
    """describe() (doctor, notebook setup cells) reports the device the labs will use, so an impossible
    $SERVELAB_DEVICE is an error naming the setting, not a report of 'cpu'."""
    monkeypatch.setenv(device.DEVICE_ENV, setting)
    with pytest.raises(device.DeviceError, match=rf"^\$SERVELAB_DEVICE={setting}: "):
        device.describe()
    assert device.describe("cpu")["device"] == "cpu"
