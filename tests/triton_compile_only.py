"""Compile every Triton kernel that the optimizers and layers launch for an sm_90 GPU, without a GPU:
run with TRITON_INTERPRET=0, launches are replaced by a compile through Triton's CUDA backend (to
PTX and cubin, with the ptxas Triton ships), and the ops run on CPU tensors with the triton backend
chosen. Nothing runs; what compiled Triton rejects and the interpreter accepts fails here.
Prints one line per compiled kernel specialization; run by tests/test_triton_compile.py."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
try:  # internals of Triton's launch path (3.x), which the compile-only launch below reuses
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as e:
    print(f"unsupported triton: {e}")
    sys.exit(77)

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
compiled: set = set()


def compile_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run's specialization and compile, without the launch (Triton 3.x internals)."""
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    key = (self.fn.__qualname__, repr(signature), repr(constexprs), repr(attrs))
    if key not in compiled:
        triton_compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
        compiled.add(key)
        print("compiled", self.fn.__qualname__, flush=True)


JITFunction.run = compile_only

import pyeff  # noqa: E402
import pyeff.nn.functional as PF  # noqa: E402
from pyeff.kernels.cross_entropy import rescale_  # noqa: E402
from pyeff.ops import _registry  # noqa: E402

_choose = _registry._choose
_registry._choose = lambda name, device_type, backend: (
    "triton" if _registry._OPS[name].has("triton") else _choose(name, device_type, None))


def params(dtype, sizes=(5, 4099), sparse=False):
    ps = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]
    for p in ps:
        p.grad = torch.randn_like(p)
    if sparse:
        emb = torch.nn.Parameter(torch.randn(50, 8))
        emb.grad = torch.sparse_coo_tensor(torch.tensor([[1, 7, 7]]), torch.randn(3, 8), (50, 8))
        ps.append(emb)
    return ps


def optimizer_steps():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    lr = torch.tensor(1e-3)
    for cls in (pyeff.optim.Adam, pyeff.optim.AdamW):
        for dtype, extra in [(fp32, {}), (fp32, dict(amsgrad=True, maximize=True, lr=lr)),
                             (torch.float64, {}), (fp16, {}), (bf16, dict(master_weights=True, max_grad_norm=1.0)),
                             (bf16, dict(kahan_summation=True)), (bf16, dict(stochastic_rounding=True)),
                             (fp32, dict(state_dtype=bf16)), (fp32, dict(state_dtype=bf16, stochastic_rounding=True)),
                             (fp32, dict(state_dtype="int8")), (fp32, dict(state_dtype="int8", amsgrad=True)),
                             (fp32, dict(state_dtype="int8", stochastic_rounding=True))]:
            yield cls, dtype, extra, False
    for dtype, extra, sparse in [(fp32, {}, False), (fp32, {}, True), (bf16, dict(master_weights=True), False),
                                 (bf16, dict(kahan_summation=True), False), (fp32, dict(state_dtype="int8"), False),
                                 (fp32, dict(state_dtype="int8", stochastic_rounding=True), False),
                                 (fp32, dict(state_dtype=bf16, stochastic_rounding=True), False)]:
        yield pyeff.optim.Adagrad, dtype, extra, sparse
    for dtype, extra in [(fp32, dict(momentum=0.9)), (fp32, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
                         (fp32, {}), (bf16, dict(momentum=0.9, master_weights=True)),
                         (bf16, dict(momentum=0.9, kahan_summation=True))]:
        yield pyeff.optim.SGD, dtype, extra, False


def main() -> int:
    torch.manual_seed(0)
    for cls, dtype, extra, sparse in optimizer_steps():
        opt = cls(params(dtype, sparse=sparse), **{"lr": 1e-2, **extra})
        scaler = pyeff.amp.GradScaler("cpu", init_scale=2.0**4)
        opt.step()
        scaler.scale(torch.ones(()))  # creates the scale
        scaler.step(opt)  # loss-scale unscaling and the overflow flag fused into the step
        scaler.update()
    n, d, v = 6, 100, 1000
    for dtype in (torch.float32, torch.bfloat16):
        def leaf(*shape):
            return torch.randn(*shape, dtype=dtype, requires_grad=True)
        target = torch.randint(0, v, (n,))
        target[2] = -100
        outs = [PF.layer_norm(leaf(n, d), (d,), leaf(d), leaf(d)), PF.rms_norm(leaf(n, d), (d,), leaf(d)),
                *PF.add_layer_norm(leaf(n, d), leaf(n, d), (d,), leaf(d), leaf(d)),
                *PF.add_rms_norm(leaf(n, d), leaf(n, d), (d,), leaf(d)),
                PF.bias_gelu(leaf(n, d), leaf(d), approximate="tanh"), PF.bias_gelu(leaf(n, d), leaf(d)),
                PF.swiglu(leaf(n, 2 * d)), PF.swiglu(leaf(n, d), leaf(n, d)),
                PF.cross_entropy(leaf(n, v), target, label_smoothing=0.1),
                PF.cross_entropy(leaf(n, v), target, weight=torch.rand(v).to(dtype), reduction="none"),
                PF.linear_cross_entropy(leaf(n, 64), leaf(v, 64), target, leaf(v))]
        sum(o.float().sum() for o in outs).backward()
        rescale_([torch.randn(n, v).to(dtype)], torch.tensor(2.0), torch.ones(()))  # GPU losses' backward only
    print(f"{len(compiled)} kernel specializations compiled for {TARGET.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
