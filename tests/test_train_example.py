"""examples/ under torchrun (2 gloo processes). train.py: a run stopped and resumed from its
checkpoint ends bitwise where the uninterrupted run ends; the random state it restores matters;
--stock and `pyeff train` run; bad arguments fail with a message. resnet.py trains."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "train.py"
# Tiny, with dropout so that the random state takes part.
TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--steps", "6",
        "--warmup", "2", "--eval-every", "3", "--eval-batches", "2", "--dropout", "0.1", "--corpus-bytes", "200000",
        "--log-every", "1", "--no-progress"]


def _run(*args, nproc=2, module=False, script=TRAIN, tiny=TINY):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = ["-m", "pyeff", "train"] if module else [str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + target + [*tiny, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _differences(a: Path, b: Path) -> list[str]:
    fa, fb = (dict(_flat(torch.load(p / "ckpt" / "state.pt", weights_only=False))) for p in (a, b))
    assert fa.keys() == fb.keys()
    return [k for k in fa if not (torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k])]


def _val_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def test_resumed_run_continues_bitwise(tmp_path):
    whole, parts, no_rng = tmp_path / "whole", tmp_path / "parts", tmp_path / "no_rng"
    _run("--out", whole)
    _run("--out", parts, "--stop-at", 3)
    shutil.copytree(parts, no_rng)
    _run("--out", parts, "--resume")
    # Model, optimizer (fp32 masters, moments, steps), scaler, scheduler: the same bits.
    assert _differences(whole, parts) == []
    assert _val_losses(whole) == _val_losses(parts)
    # Without the saved random state (dropout), the continuation differs: the test can tell.
    for f in (no_rng / "ckpt").glob("rng-rank*.pt"):
        f.unlink()
    proc = _run("--out", no_rng, "--resume")
    assert "random state not restored" in proc.stderr
    assert _differences(whole, no_rng) != []
    # A checkpoint of another set-up is refused, with what differs.
    proc = subprocess.run([sys.executable, str(TRAIN), *TINY, "--out", str(whole), "--resume", "--stock"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0 and "stock: checkpoint False, now True" in proc.stderr


def test_stock_run_through_the_cli(tmp_path):
    out = tmp_path / "stock"
    proc = _run("--out", out, "--stock", module=True)
    assert "stock torch, 2 process(es) on cpu (gloo)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "stock" and summary["world"] == 2 and summary["steps_run"] == 6
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_mib_max_over_ranks"] > 0
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses if "loss" in r)
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((out / "tb").iterdir())


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("example_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--stop-at", "0"], "Invalid --stop-at 0"),
    (["--steps", "10", "--stop-at", "11"], "Invalid --stop-at 11"),
    (["--steps", "0"], "Invalid --steps: 0"),
    (["--steps", "5", "--warmup", "5"], "Invalid --warmup 5"),
])
def test_bad_arguments_fail_with_a_message(train_module, args, message):
    with pytest.raises(SystemExit, match=message):
        train_module.parse_args(args)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), *TINY, "--out", str(tmp_path), "--resume"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr


def test_resnet_example_trains_under_torchrun():
    proc = _run("--steps", 12, "--batch-size", 16, "--clip", 1.0, script=ROOT / "examples" / "resnet.py", tiny=[])
    assert "ResNet-18 from" in proc.stdout and "pyeff.optim.AdamW, bf16, 2 process(es)" in proc.stdout
    accuracy = float(proc.stdout.split("held-out accuracy ")[1].split()[0])
    assert accuracy > 0.3  # chance is 0.1: the generated classes are learnable in a few steps


@pytest.mark.parametrize("stock", [False, True])
def test_a_skipped_step_leaves_the_schedule_and_the_weights(train_module, stock, tmp_path):
    import torch.distributed as dist
    from _gloo import free_port

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        args = train_module.parse_args([*TINY, "--out", str(tmp_path)] + (["--stock"] if stock else []))
        model, ddp, opt, scaler, sched = train_module.build(args, torch.device("cpu"), 1)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        x = torch.randint(0, 256, (4, 32))
        train_module.train_step(args, ddp, model, opt, scaler, sched, x, x, autocast)
        assert sched.last_epoch == 1
        with torch.no_grad():
            model.blocks[0].mlp[0].bias[0] = float("inf")  # every gradient after it becomes inf/NaN
        before = [p.detach().clone() for p in model.parameters()]
        _, norm, skipped = train_module.train_step(args, ddp, model, opt, scaler, sched, x, x, autocast)
        assert skipped and not torch.isfinite(torch.as_tensor(norm))
        assert sched.last_epoch == 1  # the LR did not advance
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        dist.destroy_process_group()
