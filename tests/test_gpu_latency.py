"""Latency that means something on a GPU, and evaluation that replays the run (issue #27 items 2, 4
and 7), shown on the CPU: the latency batch decided per device, the clock chosen by the device type
(the CUDA path run with stand-in events), only the main process timing, the same report fields on
every device, ``upop evaluate`` of a run's folder under the run's precision and TF32, and the
process group's timeout."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from torch import nn

import upop.measure.latency as latency
from upop.api import evaluate
from upop.cli.main import main
from upop.config import AS_SET, DECIDED, LATENCY_BATCH_GPU, ResolvedSettings, UPopConfig
from upop.engine.runtime import PROCESS_GROUP_TIMEOUT_MINUTES, make_accelerator, process_group_kwargs, tf32_enabled
from upop.errors import ConfigError
from upop.measure.timing import EVENTS, WALL, clock_name, time_calls
from upop.tasks import get_task

from ._families import clip_world

#: device type -> (the latency batch ``auto`` decides, the clock of the timings)
DEVICES = {"cpu": (1, WALL), "cuda": (LATENCY_BATCH_GPU, EVENTS)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_the_latency_batch_is_decided_per_device_with_its_reason(device):
    batch, _ = DEVICES[device]
    settings = UPopConfig().resolve("retrieval", device_type=device)
    assert "latency_batch_size" in DECIDED and UPopConfig().latency_batch_size == "auto"
    assert settings["latency_batch_size"] == batch and settings.given["latency_batch_size"] == "auto"
    assert settings.why["latency_batch_size"].startswith("auto") and device.upper() in settings.why["latency_batch_size"]
    assert settings.config().latency_batch_size == batch  # what the run's loops, table and report read
    explicit = UPopConfig(latency_batch_size=5).resolve("retrieval", device_type=device)
    assert explicit["latency_batch_size"] == 5 and explicit.why["latency_batch_size"] == AS_SET


@pytest.mark.parametrize("value", [0, "fast", 1.5, True, 5000])
def test_a_bad_latency_batch_is_one_line(value):
    with pytest.raises(ConfigError, match=r"latency_batch_size=.* auto or an integer in \[1, 4096\]") as info:
        UPopConfig(latency_batch_size=value)
    assert "\n" not in str(info.value)


def test_settings_recorded_before_the_decision_still_load():
    data = json.loads(json.dumps(UPopConfig(latency_batch_size=1).resolve("retrieval").to_dict()))
    del data["why"]["latency_batch_size"]  # a run.json written before latency_batch_size was decided
    settings = ResolvedSettings.from_dict(data)
    assert settings["latency_batch_size"] == 1 and settings.why["latency_batch_size"].startswith("recorded before")


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_the_clock_follows_the_device_type(device):
    assert clock_name(torch.device(device)) == DEVICES[device][1]


class FakeEvents:
    """Stand-ins of ``torch.cuda.Event`` and ``torch.cuda.synchronize`` that log what the timing did;
    an event read before the synchronise fails, as a CUDA event not yet reached would."""

    def __init__(self):
        self.log: list[str] = []
        self.now = 0.0
        self.synced = False
        outer = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "events must be created with enable_timing=True"
                self.at = None

            def record(self):
                outer.now += 1.5
                self.at = outer.now
                outer.log.append("record")

            def elapsed_time(self, end):
                assert outer.synced, "an event was read before the round's synchronise"
                return end.at - self.at

        self.Event = Event

    def synchronize(self, device):
        assert torch.device(device).type == "cuda"
        self.synced = True
        self.log.append("sync")

    def call(self):
        self.now += 2.0  # the GPU time of one call, between its two events
        self.log.append("call")
        time.sleep(0.002)


def test_the_cuda_path_times_each_call_with_an_event_pair_and_synchronises_once():
    fake = FakeEvents()
    times = time_calls(fake.call, 0.02, "cuda", event=fake.Event, synchronize=fake.synchronize)
    assert len(times) >= 2 and times == [pytest.approx(3.5)] * len(times)  # 2.0 of work + the end event's step
    assert fake.log == ["record", "call", "record"] * len(times) + ["sync"], "no host wait between calls"


def test_the_cpu_path_never_touches_cuda_events():
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA event on the CPU path")

    calls = []
    times = time_calls(lambda: calls.append(1), 0.0, "cpu", event=refuse, synchronize=refuse)
    assert len(times) == len(calls) == 1 and times[0] >= 0


class FakeDist:
    """An Accelerator / PartialState as :func:`upop.measure.latency.timed_on_main` sees it."""

    def __init__(self, main: bool, processes: int = 2, sent=None):
        self.is_main_process, self.num_processes = main, processes
        self.barriers, self.sent, self.broadcasts = 0, sent, []

    def wait_for_everyone(self):
        self.barriers += 1

    def broadcast(self, box):
        """Accelerate's broadcast_object_list: the main process sends ``box``, the others receive ``sent``."""
        self.broadcasts.append(list(box))
        if not self.is_main_process:
            box[0] = self.sent


def _never(*args, **kwargs):
    raise AssertionError("a process other than the main one timed a model")


def test_only_the_main_process_times_the_others_wait_and_receive_its_numbers():
    a, b, inputs = Tiny(), Tiny(), {"x": torch.zeros(2, 4)}
    main_dist = FakeDist(main=True)
    result = latency.timed_on_main(lambda: latency.paired_latency(a, b, inputs, rounds=1, seconds=0.0, warmup=0),
                                   main_dist, broadcast=main_dist.broadcast)
    assert main_dist.barriers == 1 and main_dist.broadcasts == [[("ok", result)]]
    other = FakeDist(main=False, sent=("ok", result))
    got = latency.timed_on_main(lambda: latency.paired_latency(a, b, inputs, timer=_never), other,
                                broadcast=other.broadcast)
    assert got == result and other.barriers == 1  # the main process's numbers, the timer never called


def test_a_failure_of_the_main_process_is_raised_on_every_process():
    main_dist = FakeDist(main=True)

    def oom():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        latency.timed_on_main(oom, main_dist, broadcast=main_dist.broadcast)
    sent = main_dist.broadcasts[0][0]
    assert sent[0] == "error" and "out of memory" in sent[1]  # the others were told before it raised
    other = FakeDist(main=False, sent=sent)
    with pytest.raises(RuntimeError, match="main process failed while timing: RuntimeError: CUDA out of memory") as info:
        latency.timed_on_main(_never, other, broadcast=other.broadcast)
    assert info.value.shared is True


def test_one_process_times_without_a_collective():
    alone = FakeDist(main=True, processes=1)
    assert latency.timed_on_main(lambda: 7, alone, broadcast=_never) == 7 and alone.barriers == 0


def test_the_report_fields_have_the_same_shape_on_every_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    setups = {device: latency.setup_of(torch.device(device), [torch.float32], DEVICES[device][0])
              for device in DEVICES}
    assert len({tuple(sorted(s)) for s in setups.values()}) == 1, setups
    for device, (batch, clock) in DEVICES.items():
        assert (setups[device]["timer"], setups[device]["batch"]) == (clock, batch)
    paired = latency.paired_latency(Tiny(), Tiny(), {"x": torch.zeros(1, 4)}, rounds=1, seconds=0.0, warmup=0)
    assert set(setups["cpu"]) <= set(paired) and paired["timer"] == WALL


def test_tf32_is_set_for_cuda_and_restored():
    before = tf32_enabled()
    with latency.tf32_as(torch.device("cuda"), not before):
        assert tf32_enabled() is (not before)
    assert tf32_enabled() is before
    with latency.tf32_as(torch.device("cpu"), not before):  # no effect off CUDA
        assert tf32_enabled() is before


def test_the_process_group_waits_longer_than_nccl_default(monkeypatch):
    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    assert process_group_kwargs()["timeout"].total_seconds() == 60 * PROCESS_GROUP_TIMEOUT_MINUTES > 600
    made = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: made.update(kw))
    make_accelerator(UPopConfig())
    handlers = [h for h in made["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
    assert len(handlers) == 1 and handlers[0].to_kwargs() == process_group_kwargs()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("world"), train=16, val=4, test=4)


@pytest.fixture()
def seen(monkeypatch):
    """The task's evaluation replaced by one that records the autocast it ran under."""
    runs: list = []

    def record(self, model, dataset, processor, batch_size, **kw):
        runs.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return {"r_mean": 1.0}

    monkeypatch.setattr(type(get_task("retrieval")), "evaluate", record)
    return runs


def _run_folder(world, root, **settings):
    """A run's folder: ``compressed`` (here the dense model) and the run.json of its resolved settings."""
    shutil.copytree(world / "model", root / "compressed")
    resolved = UPopConfig(**settings).resolve("retrieval", search_steps=10)
    (root / "run.json").write_text(json.dumps({"task": "retrieval", "settings": resolved.to_dict()}))
    return root / "compressed"


def test_evaluate_replays_the_runs_precision_and_tf32(world, tmp_path, seen, capsys):
    folder = _run_folder(world, tmp_path, eval_precision="bf16", tf32=False)
    metrics = evaluate(folder, "retrieval", world / "data", config=UPopConfig())  # as the CLI calls it
    assert metrics == {"r_mean": 1.0} and seen == [torch.bfloat16]
    assert metrics.setup == {"eval_precision": "bf16", "tf32": False, "from": "run"}
    capsys.readouterr()
    assert main(["evaluate", "--model", str(folder), "--task", "retrieval", "--data", str(world / "data")]) == 0
    assert json.loads(capsys.readouterr().out) == {"r_mean": 1.0} and seen[-1] == torch.bfloat16
    forced = evaluate(folder, "retrieval", world / "data", precision="fp32")
    assert seen[-1] is None and forced.setup == {"eval_precision": "fp32", "tf32": False, "from": "argument"}
    plain = evaluate(world / "model", "retrieval", world / "data")  # no run: the defaults
    assert seen[-1] is None and plain.setup == {"eval_precision": "fp32", "tf32": True, "from": "config"}


def test_time_models_decides_the_batch_as_a_run(world):
    from upop.measure.latency import time_models

    result = time_models(world / "model", task="retrieval", data=world / "data", seconds=0.01, rounds=1)
    assert result["batch"] == UPopConfig().resolve("retrieval", device_type="cpu")["latency_batch_size"] == 1
    assert result["timer"] == WALL
