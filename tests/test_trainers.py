"""pyeff optimizers as the optimizer of Hugging Face's Trainer and of PyTorch Lightning, with their
mixed-precision set-ups, on the CPU: short runs that train, checkpoint and resume. Skipped with the
reason where transformers / pytorch_lightning are not installed (the Makefile installs both)."""

import pytest
import torch

import pyeff


STEPS = 6


class Regressor(torch.nn.Module):
    """A tiny model in Trainer's convention: forward(x, labels) -> {"loss": ...}."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _samples(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, save_steps=3,
                             logging_steps=1, report_to=[], use_cpu=True, bf16=True, remove_unused_columns=False,
                             max_grad_norm=0.0,  # clipping is fused into the pyeff step
                             dataloader_num_workers=0, seed=0, **kw)


def _initial(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(model, before):
    return all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hf_trainer_with_pyeff_optimizer_and_scheduler(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Regressor()
    before = _initial(model)
    opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path), train_dataset=_samples(),
                                   optimizers=(opt, sched))
    out = trainer.train()
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    assert out.global_step == STEPS and torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(model, before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert opt.grad_norm is not None and torch.isfinite(opt.grad_norm)
    assert sched.last_epoch == STEPS
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert saved["state"][0]["step"].item() == 3  # torch.optim's layout, loadable by torch.optim.AdamW

    # Resume from step 3 into a fresh model and optimizer: it reaches the same parameters.
    torch.manual_seed(0)
    model2 = Regressor()
    opt2 = pyeff.optim.AdamW(model2.parameters(), lr=1e-2, max_grad_norm=1.0)
    sched2 = transformers.get_linear_schedule_with_warmup(opt2, num_warmup_steps=2, num_training_steps=STEPS)
    trainer2 = transformers.Trainer(model=model2, args=_hf_args(tmp_path / "resumed"), train_dataset=_samples(),
                                    optimizers=(opt2, sched2))
    trainer2.train(resume_from_checkpoint=str(ckpt))
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hf_trainer_builds_a_pyeff_optimizer_from_its_class(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Regressor()
    before = _initial(model)
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, weight_decay=0.1), train_dataset=_samples(),
                                   optimizer_cls_and_kwargs=(pyeff.optim.AdamW, {"lr": 1e-2, "max_grad_norm": 1.0}))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, pyeff.optim.AdamW)
    assert {g["weight_decay"] for g in inner.param_groups} == {0.0, 0.1}  # Trainer's decay / no-decay groups
    assert _changed(model, before)


def _lightning_module(pl, master_weights=False):
    class LitRegressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Regressor()

        def training_step(self, batch, _):
            loss = self.model(batch["x"], batch["labels"])["loss"]
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            opt = pyeff.optim.AdamW(self.parameters(), lr=1e-2, max_grad_norm=1.0, master_weights=master_weights)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_samples(), batch_size=8)

    return LitRegressor()


def _lightning_trainer(pl, tmp_path, precision, steps=STEPS):
    kw = {"precision": precision}
    if precision == "16-mixed":  # Lightning turns precision="16-mixed" into bf16 on the CPU; its plugin does not
        scaler = torch.amp.GradScaler("cpu", init_scale=256)
        kw = {"plugins": [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)]}
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, **kw, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_lightning_configure_optimizers_with_pyeff(tmp_path, precision):
    pl = pytest.importorskip("pytorch_lightning")
    torch.manual_seed(0)
    module = _lightning_module(pl, master_weights=precision == "bf16-true")
    before = _initial(module)
    trainer = _lightning_trainer(pl, tmp_path, precision)
    trainer.fit(module)
    assert trainer.global_step == STEPS
    opt = trainer.optimizers[0]
    assert isinstance(opt, pyeff.optim.AdamW)
    assert _changed(module, before)
    assert torch.isfinite(opt.grad_norm)
    if precision == "16-mixed":  # Lightning's MixedPrecision plugin: torch's GradScaler hands the scale over
        assert trainer.precision_plugin.scaler is not None
    if precision == "bf16-true":  # bf16 parameters, fp32 masters in the optimizer
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
        assert all(s["master_param"].dtype == torch.float32 for s in opt.state.values())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["optimizer_states"][0]["state"][0]["step"].item() == STEPS

    # Resume for two more steps from the checkpoint.
    module2 = _lightning_module(pl, master_weights=precision == "bf16-true")
    trainer2 = _lightning_trainer(pl, tmp_path / "resumed", precision, steps=STEPS + 2)
    trainer2.fit(module2, ckpt_path=str(last))
    assert trainer2.global_step == STEPS + 2
    assert trainer2.optimizers[0].state[next(module2.parameters())]["step"].item() == STEPS + 2
