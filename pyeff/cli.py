"""The `pyeff` command (also `python -m pyeff`): `info`, `bench` and `train`."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
EXAMPLES_DIR = BENCH_DIR.parent / "examples"


def info() -> dict:
    import torch

    import pyeff
    from pyeff import _ext
    from pyeff.ops import OPS
    from pyeff.ops._registry import BACKENDS, backend_usable, triton_available

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    backends = {}
    for b in BACKENDS:
        reasons = {str(d): backend_usable(b, d) for d in devices}
        usable = [d for d, why in reasons.items() if why is None]
        backends[b] = {"usable_on": usable, "why_not": {d: w for d, w in reasons.items() if w}}
    # Per op: the backends it has here, and the one the automatic choice runs for each device kind.
    kinds = ("cpu", "cuda", "meta")
    ops = {name: {"backends": op.backends(), "runs": {k: op.choose(torch.device(k)) for k in kinds}}
           for name, op in OPS.items()}
    return {
        "pyeff": pyeff.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version if triton_available() else None,
        "extension": {"built": _ext.available(), "error": _ext.load_error(), "cuda_kernels": _ext.built_with_cuda()},
        "backends": backends,
        "ops": ops,
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "simd": _cpu_flags(), "kernel_isa": _ext.cpu_isa(),
                "threads": torch.get_num_threads()},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile",
              "asimd", "sve")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def print_info(as_json: bool) -> None:
    data = info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    ext = data["extension"]
    cpu = data["cpu"]
    print(f"pyeff {data['pyeff']}  python {data['python']}  torch {data['torch']} (cuda {data['torch_cuda']})  "
          f"triton {data['triton']}")
    print(f"extension pyeff._C: {'built' if ext['built'] else 'NOT built: ' + str(ext['error'])}"
          f"{', with CUDA kernels' if ext['cuda_kernels'] else ''}")
    print(f"cpu: {cpu['name']}, {cpu['cores']} cores, {cpu['threads']} threads (torch.get_num_threads)")
    print(f"     simd: {' '.join(cpu['simd']) or 'unknown'}; CPU kernels run with: {cpu['kernel_isa']}")
    print(f"gpu: {data['gpu']}")
    print("backends:")
    for name, b in data["backends"].items():
        if b["usable_on"]:
            print(f"  {name:10s} usable on {', '.join(b['usable_on'])}")
        else:
            print(f"  {name:10s} not usable: {'; '.join(b['why_not'].values())}")
    cuda_note = "" if data["gpu"] else " (no CUDA device here: what CUDA tensors would get)"
    print(f"ops: the backends each has, and the one that runs on cpu / cuda{cuda_note} / meta tensors:")
    for name, op in data["ops"].items():
        runs = " / ".join(op["runs"][k] for k in ("cpu", "cuda", "meta"))
        print(f"  {name:20s} {', '.join(op['backends']):32s} runs {runs}")


def suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BENCH_DIR.glob("*.py")) if not p.name.startswith("_")}


def _suite_list() -> str:
    """`pyeff bench --help`'s list: each suite with its docstring's first paragraph (read, not imported)."""
    lines = []
    for name, path in suites().items():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0]
        lines += textwrap.wrap(" ".join(doc.split()), 100, initial_indent=f"  {name:11s} ", subsequent_indent=" " * 14)
    return "suites:\n" + "\n".join(lines) if lines else f"no suites found in {BENCH_DIR}"


def bench(names: list[str], quick: bool, out: Path | None) -> int:
    available = suites()
    if not available:
        print(f"pyeff bench: no suites found in {BENCH_DIR}; it runs the source tree's benchmarks/ "
              "(install with `pip install --no-build-isolation -e .`)", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"pyeff bench: unknown suite(s) {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH_DIR))
    import _common

    _common.ensure_passive_wait()
    for name in names or list(available):
        spec = importlib.util.spec_from_file_location(f"pyeff_bench_{name}", available[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"\n== {name}{' (quick)' if quick else ''}", flush=True)
        module.run(quick, out)
    print(f"\nresults: {out or _common.OUT_DIR}")
    return 0


def train(argv: list[str]) -> int:
    """examples/train.py in this process (start it under torchrun for several processes)."""
    script = EXAMPLES_DIR / "train.py"
    if not script.exists():
        print(f"pyeff train: {script} not found; it runs the source tree's examples/ "
              "(install with `pip install --no-build-isolation -e .`)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("pyeff_example_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv, prog="pyeff train")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every other argument is train.py's own (`pyeff train --help`)
        return train(argv[1:])
    parser = argparse.ArgumentParser(prog="pyeff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, built backends, CPU SIMD level, threads")
    p_info.add_argument("--json", action="store_true")
    p_bench = sub.add_parser("bench", help="run the benchmark suites (pyeff vs PyTorch, vs the machine's ceiling)",
                             epilog=_suite_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_bench.add_argument("suites", nargs="*", help="suite names (default: all)")
    p_bench.add_argument("--quick", action="store_true", help="small sizes and few rounds")
    p_bench.add_argument("--out", type=Path, default=None, help="where to write JSON/markdown/PNG results")
    sub.add_parser("train", help="train a small GPT on the Python stdlib's source (examples/train.py; "
                                 "`pyeff train --help`), under torchrun for several processes")
    args = parser.parse_args(argv)
    if args.command == "info":
        print_info(args.json)
        return 0
    return bench(args.suites, args.quick, args.out)


if __name__ == "__main__":
    sys.exit(main())
