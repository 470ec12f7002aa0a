"""patch(model): what it replaces, what it leaves alone, and that a patched transformer computes the
same outputs and gradients and keeps its state_dict.

pyeff.nn.LayerNorm / RMSNorm and pyeff.nn.functional.bias_gelu come from the fused-norms work; the
tests of patch's own logic put stand-ins (the torch layers under pyeff's names) in their place, so
they run whether or not those exist; the numerical test of the real fused layers is skipped until
they exist."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyeff


class _StandInLayerNorm(nn.LayerNorm):
    pass


class _StandInRMSNorm(nn.RMSNorm):
    pass


def _stand_in_bias_gelu(x, bias, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(pyeff.nn, "LayerNorm", _StandInLayerNorm, raising=False)
    monkeypatch.setattr(pyeff.nn, "RMSNorm", _StandInRMSNorm, raising=False)
    monkeypatch.setattr(pyeff.nn.functional, "bias_gelu", _stand_in_bias_gelu, raising=False)


class Block(nn.Module):
    """A small pre-norm transformer block with an LM head and its loss."""

    def __init__(self, d=16, heads=2, vocab=37):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0)

    def forward(self, tokens, target):
        x = self.emb(tokens)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        logits = self.head(self.norm(x))
        return self.loss(logits.flatten(0, 1), target.flatten())


def _step(model, tokens, target):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_transformer(kinds, atol, rtol):
    model = Block()
    for p in model.parameters():  # not the default init: norms and biases away from 1 and 0
        p.data.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 37, (3, 11))
    target = torch.randint(0, 37, (3, 11))
    patched = copy.deepcopy(model)
    replaced = pyeff.nn.patch(patched, **kinds)
    expected = _step(model, tokens, target)
    got = _step(patched, tokens, target)
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=rtol)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    # The checkpoints move both ways.
    assert list(patched.state_dict()) == list(model.state_dict())
    patched.load_state_dict(model.state_dict())
    Block().load_state_dict(patched.state_dict())
    return {name: type(new) for name, _, new in replaced}


def test_patch_transformer_cross_entropy_only():
    types = _check_transformer(dict(norms=False, linear_gelu=False), atol=1e-6, rtol=1e-5)
    assert types == {"loss": pyeff.nn.CrossEntropyLoss}


def test_patch_transformer_logic_with_stand_ins(stand_ins):
    types = _check_transformer({}, atol=1e-6, rtol=1e-5)
    assert types == {"ln1": _StandInLayerNorm, "ln2": _StandInLayerNorm, "norm": _StandInRMSNorm,
                     "loss": pyeff.nn.CrossEntropyLoss, "mlp.0": pyeff.nn.LinearGELU,
                     "mlp.1": nn.Identity}


def test_patch_transformer_fused_layers():
    types = _check_transformer({}, atol=1e-5, rtol=1e-4)
    assert types["ln1"] is pyeff.nn.LayerNorm and types["norm"] is pyeff.nn.RMSNorm
    assert types["mlp.0"] is pyeff.nn.LinearGELU and types["loss"] is pyeff.nn.CrossEntropyLoss


def test_patch_shares_parameters_and_buffers(stand_ins):
    w = torch.rand(5)
    model = nn.ModuleDict({"ln": nn.LayerNorm(4), "loss": nn.CrossEntropyLoss(weight=w, reduction="sum"),
                           "mlp": nn.Sequential(nn.Linear(4, 6), nn.GELU())})
    ln_weight, lin_weight, lin_bias = model.ln.weight, model.mlp[0].weight, model.mlp[0].bias
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before patch: still updates the live weights
    pyeff.nn.patch(model)
    assert model.ln.weight is ln_weight and model.loss.weight is w
    assert model.mlp[0].weight is lin_weight and model.mlp[0].bias is lin_bias
    assert model.loss.reduction == "sum"
    out = model.mlp(model.ln(torch.randn(2, 4))).sum()
    out.backward()
    before = lin_weight.detach().clone()
    opt.step()
    assert not torch.equal(model.mlp[0].weight, before)


def test_patch_leaves_alone_what_it_cannot_prove(stand_ins):
    class MyLoss(nn.CrossEntropyLoss):  # a subclass may have its own forward
        pass

    hooked = nn.LayerNorm(4)
    hooked.register_forward_hook(lambda m, i, o: o)
    shared = nn.CrossEntropyLoss()
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4, bias=False), nn.GELU()),  # no bias to fuse
        nn.ModuleList([nn.Linear(4, 4), nn.GELU()]),  # a ModuleList's caller decides the order
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        hooked, MyLoss(), shared, nn.ModuleDict({"again": shared}))
    replaced = pyeff.nn.patch(model)
    assert [name for name, _, _ in replaced] == ["5", "6.again"]
    assert model[5] is model[6]["again"] and type(model[5]) is pyeff.nn.CrossEntropyLoss  # still shared
    assert pyeff.nn.patch(model) == []  # nothing left to do
    root = nn.LayerNorm(3)
    assert pyeff.nn.patch(root) == [] and type(root) is nn.LayerNorm


def test_patch_flags_turn_kinds_off(stand_ins):
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.GELU(), nn.CrossEntropyLoss())
    assert pyeff.nn.patch(model, norms=False, linear_gelu=False, cross_entropy=False) == []
    assert [n for n, _, _ in pyeff.nn.patch(model, norms=False, cross_entropy=False)] == ["1", "2"]
    assert [n for n, _, _ in pyeff.nn.patch(model)] == ["0", "3"]


def test_patch_needs_the_fused_layers_when_it_finds_their_pattern(monkeypatch):
    monkeypatch.delattr(pyeff.nn, "LayerNorm", raising=False)
    with pytest.raises(ImportError):
        pyeff.nn.patch(nn.Sequential(nn.LayerNorm(4)))
    assert pyeff.nn.patch(nn.Sequential(nn.LayerNorm(4)), norms=False) == []


def test_linear_gelu_module(stand_ins):
    lin = nn.Linear(5, 7)
    fused = pyeff.nn.LinearGELU(5, 7, approximate="tanh")
    fused.load_state_dict(lin.state_dict())
    x = torch.randn(3, 5)
    torch.testing.assert_close(fused(x), F.gelu(lin(x), approximate="tanh"))
    assert "approximate='tanh'" in repr(fused)
    no_bias = pyeff.nn.LinearGELU(5, 7, bias=False)
    torch.testing.assert_close(no_bias(x), F.gelu(F.linear(x, no_bias.weight)))
    with pytest.raises(ValueError, match="Invalid approximate"):
        pyeff.nn.LinearGELU(5, 7, approximate="fast")
