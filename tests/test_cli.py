"""`servelab doctor` / `servelab tour` as a user meets them: a mistake is one line on stderr and exit code 1."""
import json
import shutil

import pytest
import torch

from servelab import cli, tour
from servelab.loader import SHIPPED

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only behaviour")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(f in err for f in fragments), err


@pytest.mark.parametrize("setting, says", [("tpu", "unknown device 'tpu'"),
                                           pytest.param("cuda", "no CUDA GPU", marks=needs_cpu_only)])
def test_doctor_refuses_an_impossible_servelab_device(capsys, monkeypatch, setting, says):
    monkeypatch.setenv("SERVELAB_DEVICE", setting)
    code, out, err = run(capsys, "doctor")
    assert_one_line_error(code, err, f"$SERVELAB_DEVICE={setting}", says)
    assert "what each lab can do" not in out


def test_doctor_reports_the_device_the_labs_use_and_why(capsys, monkeypatch):
    monkeypatch.setenv("SERVELAB_DEVICE", "cpu")
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "$SERVELAB_DEVICE=cpu" in out
    monkeypatch.setenv("SERVELAB_DEVICE", "tpu")
    code, out, _ = run(capsys, "doctor", "--device", "cpu")  # --device wins, as tour's does
    assert code == 0 and "requested 'cpu'" in out
    code, _, err = run(capsys, "doctor", "--device", "tpu")
    assert_one_line_error(code, err, "unknown device 'tpu'")


def test_json_goes_into_a_new_folder(capsys, tmp_path):
    out = tmp_path / "new" / "folder" / "doctor.json"
    code, _, _ = run(capsys, "doctor", "--json", str(out))
    report = json.loads(out.read_text())
    assert code == 0 and report["machine"]["device_choice"]
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["ceilings"]["matmul_flops_per_s"] > 0
    code, _, _ = run(capsys, "doctor", "--no-ceilings", "--json", str(out))
    assert code == 0 and "ceilings" not in json.loads(out.read_text())


@pytest.mark.parametrize("command", ["doctor", "tour"])
def test_unwritable_json_fails_before_the_run(capsys, tmp_path, monkeypatch, command):
    monkeypatch.setattr(tour, "run_tour", lambda **kw: pytest.fail("the tour ran before --json was checked"))
    (tmp_path / "a_file").write_text("")
    code, out, err = run(capsys, command, "--json", str(tmp_path / "a_file" / "results.json"))
    assert_one_line_error(code, err, "cannot write --json", "a_file is a file, not a folder")
    assert "servelab doctor" not in out
    code, _, err = run(capsys, command, "--json", str(tmp_path))  # a folder, not a file
    assert_one_line_error(code, err, "Is a directory")


def test_tour_writes_json_into_a_new_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tour, "run_tour", lambda **kw: {"ran": True})
    out = tmp_path / "new" / "tour.json"
    code, _, _ = run(capsys, "tour", "--json", str(out))
    assert code == 0 and json.loads(out.read_text()) == {"ran": True}


@pytest.fixture
def damaged_model(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(SHIPPED["target"], path)
    (path / "model.safetensors").write_bytes((SHIPPED["target"] / "model.safetensors").read_bytes()[:100_000])
    return path


def test_tour_with_damaged_weights_is_one_line(capsys, damaged_model):
    code, _, err = run(capsys, "tour", "--model", str(damaged_model))
    assert_one_line_error(code, err, str(damaged_model / "model.safetensors"), "damaged or incomplete",
                          "re-download")


@pytest.mark.parametrize("argv, says", [
    (["tour", "--model", "/no/such/dir"], "not found"),
    (["tour", "--draft", "/no/such/dir"], "not found"),
    (["tour", "--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(["tour", "--device", "cuda"], "no CUDA GPU", marks=needs_cpu_only),
])
def test_user_mistakes_are_one_line(capsys, argv, says):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, says)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tour", "--no-such-option"])
    assert exit_.value.code == 2
