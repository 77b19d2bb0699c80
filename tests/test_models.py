"""fastdl.models as a whole: the registry, `python -m fastdl models|train`, and the benchmark
cases that time each model beside its twin. The models themselves are tested against their
twins in test_models_<group>.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdl.__main__ import _unwritable
from fastdl.models import GROUPS, specs
from fastdl.models import train as training

ROOT = Path(__file__).resolve().parents[1]
# The cheapest model to run end to end in a subprocess.
SMALL = "autoencoder"


def _fastdl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastdl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_registry_names_every_group_and_the_issue_models():
    found = specs()
    assert {s.group for s in found.values()} == set(GROUPS)
    for name in ("resnet18", "gpt", "lstm-lm", "gcn", "gat", "gpt-int8", "mlp-int8"):
        assert name in found
    assert not found["gpt-int8"].train and found["gpt"].train


def test_models_command_lists_every_model():
    run = _fastdl("models")
    assert run.returncode == 0, run.stderr
    listed = [line.split()[0] for line in run.stdout.splitlines()]
    assert listed == list(specs())


def test_train_command_trains_beside_the_twin_and_plots(tmp_path):
    plot = tmp_path / "loss.png"
    run = _fastdl("train", SMALL, "--steps", "4", "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    assert "fastdl" in run.stdout and "torch" in run.stdout
    assert "speed-up over the torch twin" in run.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_command_refuses_an_inference_only_model_and_an_unknown_name(tmp_path):
    run = _fastdl("train", "gpt-int8", "--steps", "1", cwd=tmp_path)
    assert run.returncode == 2 and "inference-only" in run.stderr
    run = _fastdl("train", "no-such-model", cwd=tmp_path)
    assert run.returncode == 2 and "unknown model" in run.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["--steps", "abc"], "--steps: must be a positive integer, got 'abc'"),
        (["--device", "bogus"], "--device 'bogus' is not usable"),
        (["--device", "meta"], "--device must be a cpu or cuda device, got 'meta'"),
        (["--plot", "curve.svg"], "must name a .png file"),
        (["--plot", "no/such/dir/x.png"], "cannot write 'no/such/dir/x.png'"),
        (["--plot", "folder.png"], "cannot write 'folder.png': it is a folder"),
    ],
    ids=["steps", "steps_text", "device", "device_meta", "plot_suffix", "plot_dir", "plot_folder"],
)
def test_train_command_refuses_bad_options_before_training(tmp_path, args, message):
    (tmp_path / "folder.png").mkdir()
    run = _fastdl("train", SMALL, *args, cwd=tmp_path)
    # The train command's own usage, and no step run (no progress bar).
    assert run.returncode == 2 and message in run.stderr
    assert "usage: python -m fastdl train" in run.stderr and "step/s" not in run.stderr


def test_plot_probe_leaves_the_path_alone(tmp_path):
    # The folder is tried with a file of its own: a link named as the plot stays as it is, and
    # its target is not created; a link into a missing folder is refused.
    link, target = tmp_path / "curve.png", tmp_path / "target.png"
    link.symlink_to(target)
    assert _unwritable(str(link)) is None
    assert link.is_symlink() and not target.exists()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing" / "target.png")
    assert _unwritable(str(tmp_path / "dangling.png")) == "No such file or directory"
    assert (tmp_path / "dangling.png").is_symlink()
    assert _unwritable(str(tmp_path / "no" / "x.png")) == "No such file or directory"
    assert _unwritable(str(tmp_path)) == "it is a folder"


def test_train_loop_runs_the_same_batches_through_model_and_twin():
    spec = specs()[SMALL]
    run = training.train(spec, 3, torch.device("cpu"))
    assert len(run.losses["fastdl"]) == len(run.losses["torch"]) == 3
    # Same weights, same batches: the losses agree step by step (the twin tests bound this
    # tightly; here it shows the loop feeds both alike).
    assert run.losses["fastdl"] == pytest.approx(run.losses["torch"], rel=1e-3)
    assert all(t > 0 for t in run.times["fastdl"] + run.times["torch"])


def test_bench_model_cases_measure_a_model_beside_its_twin():
    from bench import cases, runner, timing

    found = {c.op: c for c in cases.select("models")}
    assert set(found) == set(specs())
    assert found["gpt"].target.eager == 1.3 and found["gpt-int8"].target.eager == 2.0
    case = found[SMALL]
    (row,) = runner.measure(case, torch.device("cpu"), timing.QUICK, {"copy_gbps": 1.0})
    assert not row["failed"], row["failed"]
    assert set(row["time_ms"]) == {"fastdl", "eager"}  # no torch.compile of an optimizer step
    assert row["rel_error"]["fastdl"] < 1e-4
