"""One C++ runtime per process: find the libstdc++ that torch loaded, and check a built pyeff._C.

A second, static copy of libstdc++ in the process (setup.py, NOTE [one C++ runtime]) breaks the
formatting of numbers in C++ error messages: they arrive cut short, or the process crashes. setup.py
links the runtime `loaded_cxx_runtime()` names and, after every build, runs this file on the result:

    python pyeff/_cxx_runtime.py PATH_TO_C_SO

in a subprocess, because of the crash. Exit status 0 when the probe's error message reaches Python
whole, 1 otherwise (a crash: a signal). It imports only torch, so it checks the file it is given,
not an installed pyeff, and setup.py can load it before pyeff is built.
"""

import sys

import torch

EXPECTED = "pyeff._C error path probe: 12345 6172.5"


def loaded_cxx_runtime() -> str | None:
    """Path of the libstdc++ shared object this process (with torch imported) has mapped, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if "/libstdc++.so" in path:
                    return path
    except OSError:  # not Linux
        pass
    return None


def probe(path: str) -> str | None:
    """None if a C++ error raised in the module at `path` reaches Python whole, else what went wrong."""
    torch.ops.load_library(path)
    try:
        torch.ops.pyeff.error_path_probe(12345)
    except RuntimeError as e:
        text = str(e)
        return None if EXPECTED in text else f"the message arrived as {text.splitlines()[0]!r}, not {EXPECTED!r}"
    return "error_path_probe returned without raising"


if __name__ == "__main__":
    problem = probe(sys.argv[1])
    if problem:
        print(problem)
    sys.exit(1 if problem else 0)
