"""The caching CPU pool (csrc/allocator/, pyeff.memory): reuse, exact statistics, the cap,
empty_cache, switching torch's allocator with live tensors, threads, and the core under
AddressSanitizer."""

import gc
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeff
import pyeff.memory as mem
from pyeff import _ext

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs pyeff._C")


@pytest.fixture(autouse=True)
def _no_gc():
    """The cyclic garbage collector could free an older test's tensors in the middle of a sequence
    whose statistics are checked: collect now, and not during the test."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def pool():
    """The pool enabled with no cap and an empty cache; restored to disabled after."""
    was_enabled = mem.is_enabled()
    cap = mem.max_cached_bytes()
    mem.enable(max_cached_bytes=None)
    mem.empty_cache()
    yield
    if not was_enabled:
        mem.disable()
    mem.set_max_cached_bytes(cap)


def delta(before, after, *keys):
    return {k: after[k] - before[k] for k in keys}


def blob(nbytes: int) -> torch.Tensor:
    """A tensor whose storage asks for exactly `nbytes` bytes."""
    return torch.empty(nbytes, dtype=torch.uint8)


def test_freed_blocks_are_reused(pool):
    for nbytes in (100, 5000, 3 * MiB + 123):
        x = blob(nbytes)
        ptr = x.data_ptr()
        assert mem.in_pool(x) and ptr % 64 == 0
        del x
        before = mem.stats()
        y = blob(nbytes)
        after = mem.stats()
        assert y.data_ptr() == ptr
        assert delta(before, after, "num_cache_hits", "num_cache_misses", "num_os_allocs") == {
            "num_cache_hits": 1, "num_cache_misses": 0, "num_os_allocs": 0}


def test_exact_statistics_after_a_known_sequence(pool):
    mem.reset_accumulated_stats()
    mem.reset_peak_stats()
    s0 = mem.stats()
    a = blob(1 * MiB)            # miss: mapped
    b = blob(3 * MiB)            # miss: mapped
    del a                        # 1 MiB cached
    c = blob(512 << 10)          # hit: split from a's block, the rest stays cached
    del b, c                     # 4 MiB cached
    e = blob(3 * MiB)            # hit: b's block (or a piece of both, if the kernel put them side by side)
    s = mem.stats()
    assert s["num_cache_hits"] == 2 and s["num_cache_misses"] == 2
    assert s["num_os_allocs"] == 2 and s["num_os_frees"] == 0 and s["num_ooms"] == 0
    assert s["allocation.large_pool.allocated"] == 4 and s["allocation.large_pool.freed"] == 3
    assert s["allocation.large_pool.current"] - s0["allocation.large_pool.current"] == 1
    assert s["allocated_bytes.large_pool.current"] - s0["allocated_bytes.large_pool.current"] == 3 * MiB
    assert s["allocated_bytes.large_pool.peak"] - s0["allocated_bytes.large_pool.current"] == 4 * MiB
    assert s["requested_bytes.large_pool.allocated"] == (1 + 3 + 0.5 + 3) * MiB
    assert s["requested_bytes.large_pool.freed"] == (1 + 3 + 0.5) * MiB
    assert s["reserved_bytes.large_pool.current"] - s0["reserved_bytes.large_pool.current"] == 4 * MiB
    assert s["cached_bytes.large_pool.current"] - s0["cached_bytes.large_pool.current"] == 1 * MiB
    assert s["cached_bytes.large_pool.peak"] - s0["cached_bytes.large_pool.current"] == 4 * MiB
    # The "all" rows add up the two pools.
    for kind in ("allocated_bytes", "requested_bytes", "reserved_bytes", "allocation"):
        for metric in ("current", "peak", "allocated", "freed"):
            if metric != "peak":
                assert s[f"{kind}.all.{metric}"] == s[f"{kind}.small_pool.{metric}"] + s[f"{kind}.large_pool.{metric}"]
    del e
    mem.empty_cache()
    s = mem.stats()
    assert s["reserved_bytes.large_pool.current"] == s["allocated_bytes.large_pool.current"]
    assert s["cached_bytes.large_pool.current"] == 0 and s["num_os_frees"] >= 1


def test_statistics_are_shaped_like_torch_cuda_memory_stats(pool):
    s = mem.stats()
    assert list(s) == sorted(s)
    for kind in ("allocated_bytes", "requested_bytes", "reserved_bytes", "allocation", "segment"):
        for p in ("all", "small_pool", "large_pool"):
            for metric in ("current", "peak", "allocated", "freed"):
                assert isinstance(s[f"{kind}.{p}.{metric}"], int)
    for p in ("all", "small_pool", "large_pool"):
        assert f"cached_bytes.{p}.current" in s and f"cached_bytes.{p}.peak" in s
    for counter in ("num_cache_hits", "num_cache_misses", "num_os_allocs", "num_os_frees", "num_os_resizes",
                    "num_ooms"):
        assert counter in s
    x = blob(2 * MiB)
    mem.reset_peak_stats()
    s = mem.stats()
    assert all(s[k] == s[k.replace(".peak", ".current")] for k in s if k.endswith(".peak"))
    mem.reset_accumulated_stats()
    s = mem.stats()
    assert all(s[k] == 0 for k in s if k.endswith((".allocated", ".freed")) or k.startswith("num_"))
    text = mem.memory_summary()
    for label in ("Allocated memory", "Reserved memory", "Cached (free) memory", "Allocations", "Cache hits",
                  "enabled"):
        assert label in text
    del x


def test_size_classes_and_alignment(pool):
    classes = mem.size_classes()
    assert classes == sorted(classes) and all(c % 64 == 0 for c in classes)
    assert all(b / a <= 1.25 for a, b in zip(classes[16:], classes[17:]))  # at most 25 % rounding
    live = []
    for nbytes in (1, 63, 64, 65, 1000, 1025, 4097, classes[-1], classes[-1] + 1, 3 * MiB + 1):
        before = mem.stats()
        live.append(blob(nbytes))
        after = mem.stats()
        assert live[-1].data_ptr() % 64 == 0
        got = after["allocated_bytes.all.current"] - before["allocated_bytes.all.current"]
        if nbytes <= classes[-1]:
            assert got == min(c for c in classes if c >= nbytes)
        else:
            assert got == -(-nbytes // 4096) * 4096 or got >= nbytes  # pages, or a whole cached block


def test_zero_size_tensors_take_no_block(pool):
    before = mem.stats()
    x = torch.empty(0)
    y = torch.empty(5, 0, 3)
    assert x.numel() == 0 and y.numel() == 0
    assert mem.stats()["allocation.all.allocated"] == before["allocation.all.allocated"]


def test_cap_is_respected(pool):
    cap = 5 * MiB
    mem.set_max_cached_bytes(cap)
    assert mem.max_cached_bytes() == cap
    mem.reset_peak_stats()
    live = [blob(3 * MiB) for _ in range(4)]
    for t in live:
        t.fill_(1)
    del t
    live.clear()
    s = mem.stats()
    assert s["cached_bytes.large_pool.current"] <= cap
    assert s["cached_bytes.large_pool.peak"] <= cap
    assert s["cached_bytes.all.current"] <= cap + s["cached_bytes.small_pool.current"]
    assert s["num_os_frees"] >= 1
    # Lowering the cap returns the excess at once.
    mem.set_max_cached_bytes(0)
    assert mem.stats()["cached_bytes.large_pool.current"] == 0
    mem.set_max_cached_bytes("64MiB")
    assert mem.max_cached_bytes() == 64 * MiB
    mem.set_max_cached_bytes(None)
    assert mem.max_cached_bytes() is None


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_empty_cache_returns_memory_to_the_os(pool):
    x = torch.ones(64 * MiB // 4)  # touched: resident
    del x
    s = mem.stats()
    assert s["cached_bytes.large_pool.current"] >= 64 * MiB
    rss = _rss_bytes()
    frees = s["num_os_frees"]
    mem.empty_cache()
    s = mem.stats()
    assert s["cached_bytes.large_pool.current"] == 0 and s["num_os_frees"] > frees
    assert rss - _rss_bytes() >= 60 * MiB


def test_enable_disable_round_trips_with_live_tensors():
    was_enabled = mem.is_enabled()
    if was_enabled:
        mem.disable()
    base = mem.stats()["allocation.all.current"]
    before = torch.randn(1000)  # torch's allocator
    assert not mem.in_pool(before)
    kept = []
    for cycle in range(3):
        assert mem.enable() and not mem.enable()  # the second call changes nothing
        assert mem.is_enabled()
        small, large = torch.full((1000,), float(cycle)), torch.full((MiB,), float(cycle))
        assert mem.in_pool(small) and mem.in_pool(large)
        kept.append((cycle, small, large))
        if cycle == 1:
            del before  # allocated before enable(): freed by torch's allocator
        assert mem.disable() and not mem.disable()
        outside = torch.randn(1000)
        assert not mem.in_pool(outside) and not mem.is_enabled()
        # After disable() nothing is cached: a pool block that dies goes back to the OS.
        cycle_, small, large = kept.pop(0)
        assert torch.equal(large, torch.full((MiB,), float(cycle_)))
        reserved = mem.stats()["reserved_bytes.large_pool.current"]
        del small, large
        assert mem.stats()["reserved_bytes.large_pool.current"] == reserved - 4 * MiB
    # A pool tensor outliving disable() can still grow (its storage keeps the pool as allocator).
    with mem.pool():
        grow = torch.arange(10.0)
    grow.resize_(MiB)
    assert torch.equal(grow[:10], torch.arange(10.0)) and mem.in_pool(grow)
    del grow
    s = mem.stats()
    assert s["allocation.all.current"] == base
    assert s["cached_bytes.all.current"] <= s["reserved_bytes.small_pool.current"]  # nothing large is kept
    if was_enabled:
        mem.enable()


def test_context_manager_restores_the_previous_state():
    was_enabled = mem.is_enabled()
    if was_enabled:
        mem.disable()
    with mem.pool(max_cached_bytes="8MiB"):
        assert mem.is_enabled() and mem.max_cached_bytes() == 8 * MiB
        with mem.pool():  # nested: leaves it enabled
            x = torch.randn(100)
        assert mem.is_enabled() and mem.in_pool(x)
    assert not mem.is_enabled()
    mem.set_max_cached_bytes(None)
    if was_enabled:
        mem.enable()


def test_threads_allocating_random_sizes_keep_their_contents(pool):
    # torch releases the GIL inside its ops, so these threads allocate and free concurrently.
    errors, before = [], mem.stats()
    n_threads, iterations = 4, 300

    def work(seed: int):
        g = torch.Generator().manual_seed(seed)
        live = []
        for i in range(iterations):
            if live and (len(live) > 20 or torch.rand((), generator=g) < 0.45):
                value, t = live.pop(int(torch.randint(len(live), (), generator=g)))
                if not bool((t == value).all()):
                    errors.append(f"thread {seed}: a block lost its contents")
            else:
                kind = int(torch.randint(4, (), generator=g))
                numel = int(torch.randint(1, [64, 4096, 100_000, 1_500_000][kind], (), generator=g))
                value = (seed * 1000 + i) % 251
                live.append((value, torch.full((numel,), value, dtype=torch.uint8)))
        for value, t in live:
            if not bool((t == value).all()):
                errors.append(f"thread {seed}: a block lost its contents")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    after = mem.stats()
    assert after["allocation.all.current"] == before["allocation.all.current"]
    d = delta(before, after, "allocation.all.allocated", "allocation.all.freed")
    assert d["allocation.all.allocated"] == d["allocation.all.freed"] > 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3 * MiB), st.booleans()), min_size=1, max_size=30))
def test_statistics_follow_a_random_sequence(ops):
    # Each entry allocates a tensor of that many bytes, or (True) frees the oldest live one; the
    # statistics must count exactly the live tensors, and every tensor keeps its contents.
    with mem.pool(max_cached_bytes=None):
        before = mem.stats()
        live = []
        for i, (nbytes, free) in enumerate(ops):
            if free and live:
                value, t = live.pop(0)
                assert bool((t == value).all())
                del t
            else:
                live.append((i % 251, torch.full((nbytes,), i % 251, dtype=torch.uint8)))
            s = mem.stats()
            assert s["requested_bytes.all.current"] - before["requested_bytes.all.current"] == sum(
                t.numel() for _, t in live)
            assert s["allocation.all.current"] - before["allocation.all.current"] == len(live)
            assert (s["reserved_bytes.all.current"] >= s["allocated_bytes.all.current"]
                    >= s["requested_bytes.all.current"])
        del live
        after = mem.stats()
        assert after["allocation.all.current"] == before["allocation.all.current"]


def test_profiler_sees_pool_allocations(pool):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.ones(MiB) * 2
        del x
    assert any(e.cpu_memory_usage != 0 for e in prof.events())


def test_training_under_the_pool_matches_torchs_allocator():
    def train():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
        opt = pyeff.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(4):
            x = torch.randn(32 * (step + 1), 64)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    plain = train()
    with mem.pool():
        pooled = train()
    for a, b in zip(plain, pooled):
        assert torch.equal(a, b)


BAD_VALUES = [(-2, "Invalid max_cached_bytes: -2"), ("lots", "Invalid max_cached_bytes: 'lots'"),
              ("12 parsecs", "Invalid max_cached_bytes"), (1.5, "Invalid max_cached_bytes: 1.5")]


@pytest.mark.parametrize("value,message", BAD_VALUES)
def test_bad_caps_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        mem.set_max_cached_bytes(value)


@pytest.mark.parametrize("text,expected", [("1024", 1024), ("512MiB", 512 * MiB), ("2GB", 2 * 10**9),
                                           ("1.5 gib", 3 << 29), ("none", None), ("-1", None), (4096, 4096)])
def test_cap_values_parse(text, expected):
    assert mem.parse_bytes(text) == expected


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_cap_from_the_environment_and_a_clean_exit():
    # The cap comes from PYEFF_MEMORY_MAX_CACHED; pool tensors alive at exit (and after fork) are fine.
    code = """
import os, torch, pyeff.memory as mem
mem.enable()
assert mem.max_cached_bytes() == 3 << 20, mem.max_cached_bytes()
keep = [torch.randn(1 << 20) for _ in range(3)]
pid = os.fork()
if pid == 0:
    x = torch.randn(1 << 20) + keep[0]
    os._exit(0 if mem.in_pool(x) else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
print("ok")
"""
    out = _run(code, PYEFF_MEMORY_MAX_CACHED="3MiB")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    bad = _run("import pyeff.memory as mem; mem.enable()", PYEFF_MEMORY_MAX_CACHED="three")
    assert bad.returncode != 0 and "Invalid PYEFF_MEMORY_MAX_CACHED: 'three'" in bad.stderr


def _compile_stress(tmp_path: Path, flags: list[str]) -> Path:
    exe = tmp_path / "pool_stress"
    cmd = ["g++", "-std=c++17", "-g", "-pthread", *flags, f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc/allocator/pool.cpp"), str(ROOT / "tests/cpp/pool_stress.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "-fsanitize=address,undefined" in flags and "sanitize" in out.stderr:
        pytest.skip(f"the compiler has no AddressSanitizer runtime: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    return exe


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_core_stress_under_address_sanitizer(tmp_path):
    # The torch-free core (tests/cpp/pool_stress.cpp): exact statistics, then threads allocating and
    # freeing random sizes with content checks; ASan/UBSan catch overflows, use after free, leaks.
    exe = _compile_stress(tmp_path, ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                                     "-fno-sanitize-recover=all"])
    out = subprocess.run([str(exe), "4", "10000", "3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
