"""The memory layout a network trains in: by default a fixed rule (two runs give the same bits); on request
timed per machine on one step of each, without touching the model, its BatchNorm statistics or the random
number generators; never timed with --deterministic."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from clinicadl_app.core.config import Train
from clinicadl_app.group import runtime
from clinicadl_app.group.networks import build_network

SHAPE = (1, 84, 104, 90)  # a 2 mm image


@pytest.fixture(autouse=True)
def no_cached_choice():
    runtime._CHOSEN.clear()
    yield
    runtime._CHOSEN.clear()


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("Conv5_FC3", SHAPE, 2)


def test_probe_times_both_layouts_and_takes_the_faster_leaving_model_and_generators_alone(caplog):
    model = network()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    device = runtime.Device(torch.device("cpu"), None)
    state = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger=runtime.log.name):
        chosen = runtime.choose_memory_format(model, Train(memory_layout="probe"), device, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state), "the probe consumed random numbers"
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "the probe changed the model"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory layout")]
    times = dict((name, float(seconds)) for name, seconds in re.findall(r"(channels-last|contiguous) ([\d.]+) s", line))
    assert set(times) == {"channels-last", "contiguous"}
    faster = min(times, key=times.get)
    assert chosen == (torch.channels_last_3d if faster == "channels-last" else torch.contiguous_format)
    assert line.startswith(f"memory layout: {faster}")
    # one probe per network shape: a second fold (or part network) reuses the choice without timing again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=runtime.log.name):
        assert runtime.choose_memory_format(network(), Train(memory_layout="probe"), device, batch_size=2) == chosen
    assert not [r for r in caplog.records if r.getMessage().startswith("memory layout")]


@pytest.mark.parametrize(("settings", "amp", "expected"), [
    (Train(), None, torch.channels_last_3d),
    (Train(), torch.bfloat16, torch.channels_last_3d),  # the blocks run fused in bfloat16 too
    (Train(memory_layout="contiguous"), torch.bfloat16, torch.contiguous_format),
    (Train(memory_layout="channels_last"), torch.bfloat16, torch.channels_last_3d),
    (Train(memory_layout="contiguous"), None, torch.contiguous_format),
    (Train(deterministic=True, memory_layout="probe"), None, torch.channels_last_3d),
    (Train(deterministic=True, memory_layout="probe"), torch.bfloat16, torch.channels_last_3d),
])
def test_auto_a_given_layout_or_deterministic_is_not_timed(settings, amp, expected, caplog):
    runtime._warn_once.cache_clear()
    model = network()
    with caplog.at_level(logging.INFO, logger=runtime.log.name):
        chosen = runtime.choose_memory_format(model, settings, runtime.Device(torch.device("cpu"), amp), 2)
    assert chosen == expected
    assert not [r for r in caplog.records if r.getMessage().startswith("memory layout")]
    assert bool(caplog.records) == (settings.memory_layout == "probe"), "probe with --deterministic is told"
    model.to(memory_format=chosen)
    assert runtime.memory_format(model) == expected, "inputs must follow the layout of the model's weights"


def test_the_probe_runs_under_the_chosen_precision():
    """--amp: the steps timed are bfloat16 autocast steps, as training runs them (the hook travels with the copy)."""
    model = network()
    seen = []
    model.convolutions[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    runtime.step_seconds(model, torch.contiguous_format, runtime.Device(torch.device("cpu"), torch.bfloat16), 1)
    assert seen == [torch.bfloat16] * 2


def test_amp_on_a_cpu_without_bfloat16_instructions_is_told_it_will_be_slow(caplog):
    runtime._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=runtime.log.name):
        device = runtime.Device.choose(Train(amp=True, gpu=False))
    assert device.amp_dtype == torch.bfloat16, "--amp is what the user asked: warned about, not overridden"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    warned = [r for r in caplog.records if "no bfloat16 instructions" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


def test_an_allocator_that_cannot_be_preloaded_leaves_python_on_glibc(tmp_path):
    """A preload whose own dependency is missing (as libatomic was in the image) would stop every exec: the
    restart checks first."""
    import os
    import shutil
    import subprocess

    from clinicadl_app.core import allocator

    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "the tests need a C compiler (gcc) to build a broken library"
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "lib.c").write_text("int dep(void);\nint use(void) { return dep(); }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", tmp_path / "libdep.so", tmp_path / "dep.c"], check=True)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", tmp_path / "libbroken.so", tmp_path / "lib.c",
                    f"-L{tmp_path}", "-ldep"], check=True)
    (tmp_path / "libdep.so").unlink()
    broken = {**os.environ, "LD_PRELOAD": str(tmp_path / "libbroken.so")}
    assert not allocator._starts(broken)
    assert allocator._starts(dict(os.environ))


def test_prefaulted_memory_is_resident_and_reused_by_the_next_allocations(tmp_path):
    """The memory touched before the first training step is what the step's tensors get: no new pages for them."""
    import subprocess
    import sys

    script = tmp_path / "prefault.py"
    script.write_text("""
import re
from clinicadl_app.core import allocator
allocator.restart_with_fast_allocator()
import torch

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.ones(10).sum()  # torch's own first-use memory, before counting
n = 512 * 2**20
before = rss()
touched = allocator.prefault(n)
after_touch = rss()
again = allocator.prefault(n)
tensors = [torch.ones(n // 16) for _ in range(3)]  # 3/4 of it written in full, in blocks of another size
after_use = rss()
print(allocator.preloaded(), touched, again, after_touch - before, after_use - after_touch)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    name, touched, again, grown, more = done.stdout.split()
    n = 512 * 2**20
    assert name == "mimalloc"
    assert int(touched) == n and int(again) == 0  # once per process
    assert int(grown) > 0.9 * n  # really touched
    assert int(more) < 0.1 * n  # and reused


def test_first_activation_bytes_is_the_first_convolutions_output():
    from clinicadl_app.group.runtime import Device, first_activation_bytes

    model = build_network("Conv5_FC3", (1, 30, 36, 30), 2)
    out = model.convolutions[0](torch.zeros(3, 1, 30, 36, 30))
    cpu = Device(torch.device("cpu"), None)
    assert first_activation_bytes(model, 3, cpu) == out.numel() * 4
    assert first_activation_bytes(model, 3, Device(torch.device("cpu"), torch.bfloat16)) == out.numel() * 2
