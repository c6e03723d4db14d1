"""The paired latency: interleaved rounds, the median speedup and its spread, the noise rule, the
report fields, and ``upop evaluate --latency``. Timings are injected (no wall-clock assertions)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from torch import nn

import upop.measure.latency as latency
from upop.cli.main import _summary, main
from upop.runs.report import NOISE_LIMIT, markdown, paired_summary

from ._families import clip_world


class Tiny(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x)


class Script:
    """A timer that records its calls and answers from a list of latencies per model."""

    def __init__(self, values: dict[int, list[float]]):
        self.values, self.calls = {k: list(v) for k, v in values.items()}, []

    def __call__(self, model, inputs, seconds):
        self.calls.append((model, seconds))
        return 1e9 if seconds == 0.0 else self.values[id(model)].pop(0)  # a warm-up value must be discarded


def test_rounds_alternate_and_the_warm_up_is_discarded():
    a, b = Tiny().train(), Tiny().eval()
    assert latency.ROUNDS >= 7
    times = {id(a): [float(i + 1) for i in range(latency.ROUNDS)], id(b): [10.0 + i for i in range(latency.ROUNDS)]}
    timer = Script(times)
    got = latency.timed_rounds([a, b], {"x": torch.zeros(1, 4)}, seconds=0.7, timer=timer)
    assert got == [times[id(a)], times[id(b)]] and len(got[0]) == latency.ROUNDS
    warm, timed = timer.calls[:2 * latency.WARMUP], timer.calls[2 * latency.WARMUP:]
    assert all(s == 0.0 for _, s in warm)
    assert all(s == pytest.approx(latency.BUDGET * 0.7 / latency.ROUNDS) for _, s in timed)
    firsts = [timed[2 * r][0] for r in range(latency.ROUNDS)]
    assert firsts == [a if r % 2 == 0 else b for r in range(latency.ROUNDS)], "the order alternates every round"
    assert a.training and not b.training, "train/eval modes are restored"


def _numpy_summary(dense, comp):
    s = np.asarray(dense) / np.asarray(comp)
    q1, q3 = np.percentile(s, [25, 75])
    return {"speedup": np.median(s), "dense_ms": np.median(dense), "compressed_ms": np.median(comp),
            "min": s.min(), "max": s.max(), "q1": q1, "q3": q3, "relative_iqr": (q3 - q1) / np.median(s)}


SUMMARY_CASES = {
    "seven rounds": ([10, 11, 9, 12, 10, 13, 10], [5, 6, 5, 5, 7, 6, 4]),
    "eight rounds": ([3.0, 3.1, 2.9, 3.3, 3.2, 3.0, 2.8, 3.4], [2.0, 2.1, 1.9, 2.4, 2.0, 2.2, 2.1, 1.8]),
    "one round": ([4.0], [2.5]),
}


@pytest.mark.parametrize("case", sorted(SUMMARY_CASES))
def test_median_and_spread_of_the_per_round_speedups(case):
    dense, comp = SUMMARY_CASES[case]
    got, want = paired_summary(dense, comp), _numpy_summary(dense, comp)
    assert got["rounds"] == len(dense)
    for key in ("speedup", "dense_ms", "compressed_ms"):
        assert got[key] == pytest.approx(want[key])
    for key in ("min", "max", "q1", "q3", "relative_iqr"):
        assert got["speedup_spread"][key] == pytest.approx(want[key])
    assert got["speedup_per_round"] == pytest.approx(list(np.asarray(dense) / np.asarray(comp)))


def _speedups(iqr: float, low: float = 0.9, high: float = 1.1) -> list[float]:
    """Seven per-round speedups with median 1, quartiles 1 -/+ iqr/2 and the extremes low/high."""
    return [low, 1 - iqr / 2, 1 - iqr / 2, 1.0, 1 + iqr / 2, 1 + iqr / 2, high]


NOISE_CASES = [  # (per-round speedups, noisy)
    (_speedups(NOISE_LIMIT - 0.01), False),
    (_speedups(NOISE_LIMIT + 0.01), True),
    (_speedups(0.02, low=0.3, high=3.0), False),  # two outlier rounds: the median holds, not noisy
    (_speedups(0.0), False),
]


@pytest.mark.parametrize("speedups,noisy", NOISE_CASES)
def test_the_noise_rule_flips_at_the_limit(speedups, noisy):
    comp = [2.0] * len(speedups)
    summary = paired_summary([s * c for s, c in zip(speedups, comp)], comp)
    assert summary["speedup"] == pytest.approx(1.0)
    assert summary["noisy"] is noisy


def test_real_timer_and_a_truthful_setup():
    a, b = Tiny(), Tiny()
    inputs = {"x": torch.zeros(3, 4)}
    assert latency.forward_ms(a, inputs, 0.0) > 0
    calls = []
    assert latency.forward_ms(a, inputs, 0.0, forward=lambda m, x: calls.append((m, x))) > 0
    assert calls == [(a, inputs)]  # a given forward replaces model(**inputs), once for 0 seconds
    result = latency.paired_latency(a, b, inputs, seconds=0.001, warmup=1)
    assert result["rounds"] == latency.ROUNDS and len(result["dense_ms_per_round"]) == latency.ROUNDS
    assert (result["device"], result["dtype"], result["batch"], result["autocast"]) == ("cpu", "float32", 3, None)
    assert result["threads"] == torch.get_num_threads() and result["tf32"] is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert latency.paired_latency(a, b, inputs, rounds=1, seconds=0.0, warmup=0)["autocast"] == "bfloat16"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return clip_world(tmp_path_factory.mktemp("world"), train=32, val=8, test=8)


def _noisy_timer():
    """Dense (the first model timed) 10 ms; compressed 5 or 9 ms in turn: per-round speedups 2.0
    and 1.11, a wide spread."""
    order: list[int] = []
    calls: dict[int, int] = {}

    def timer(model, inputs, seconds):
        if id(model) not in order:
            order.append(id(model))
        if seconds == 0.0:  # warm-up
            return 0.0
        calls[id(model)] = calls.get(id(model), 0) + 1
        if order.index(id(model)) == 0:
            return 10.0
        return 5.0 if calls[id(model)] % 2 else 9.0

    return timer


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "forward_ms", _noisy_timer())
        assert main(["compress", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"),
                     "--out", str(out), "--search-epochs", "1", "--retrain-epochs", "0", "--batch-size", "8",
                     "--latency-time", "0.02", "--no-progress"]) == 0
    return out


def test_the_report_carries_the_spread_and_the_noise_flag(run, world):
    report = json.loads((run / "report.json").read_text())
    latency = report["latency"]
    assert report["speedup"] == latency["speedup"] and latency["rounds"] >= 7
    assert report["dense"]["latency_ms"] == 10.0 and report["compressed"]["latency_ms"] == latency["compressed_ms"]
    assert report["speedup_spread"]["min"] == pytest.approx(10 / 9) and report["speedup_spread"]["max"] == 2.0
    assert report["latency_noisy"] is True
    assert (latency["device"], latency["dtype"], latency["batch"]) == ("cpu", "float32", 1)
    assert latency["threads"] == torch.get_num_threads() and f"{latency['threads']} CPU thread" in report["latency_input"]
    md = (run / "report.md").read_text()
    assert "Noisy latency measurement" in md and latency["retime_command"] in md
    assert f"{report['speedup']:.2f}x" in md
    summary = _summary(report, run)
    assert summary.rstrip().splitlines()[-1].startswith("upop: the machine was noisy")
    quiet = {**report, "latency_noisy": False}
    assert "Noisy" not in markdown(quiet) and "noisy" not in _summary(quiet, run)


def test_the_retime_command_of_the_report_runs(run, world, capsys):
    command = json.loads((run / "report.json").read_text())["latency"]["retime_command"]
    words = shlex.split(command)
    assert words[:3] == ["upop", "evaluate", "--latency"]
    assert words[words.index("--baseline") + 1] == str(world / "model")
    capsys.readouterr()
    assert main(words[1:]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["latency_ms"]) == {"model", "baseline"} and result["rounds"] >= 7


@pytest.mark.parametrize("baseline", [False, True])
def test_cli_evaluate_latency_prints_json(world, capsys, baseline):
    argv = ["evaluate", "--latency", "--model", str(world / "model"), "--task", "retrieval", "--data",
            str(world / "data"), "--latency-time", "0.01", "--latency-batch-size", "2"]
    capsys.readouterr()
    assert main(argv + (["--baseline", str(world / "model")] if baseline else [])) == 0
    result = json.loads(capsys.readouterr().out)
    names = {"model", "baseline"} if baseline else {"model"}
    assert set(result["latency_ms"]) == names and all(v > 0 for v in result["latency_ms"].values())
    assert all(len(result["latency_ms_per_round"][n]) == result["rounds"] >= 7 for n in names)
    assert (result["device"], result["dtype"], result["batch"], result["split"]) == ("cpu", "float32", 2, "test")
    assert isinstance(result["latency_noisy"], bool) and result["threads"] == torch.get_num_threads()
    if baseline:
        assert result["speedup"] > 0 and set(result["speedup_spread"]) == {"min", "max", "q1", "q3", "relative_iqr"}
    else:
        assert result["speedup"] is None and "metrics" not in result


BAD = {  # extra arguments -> a word of the one-line error
    "--baseline without --latency": (["--baseline", "{model}"], "--baseline"),
    "--latency-time without --latency": (["--latency-time", "1"], "--latency-time"),
    "--tf32 without --latency": (["--tf32", "false"], "--tf32"),
    "--batch-size with --latency": (["--latency", "--batch-size", "4"], "--latency-batch-size"),
    "negative --latency-time": (["--latency", "--latency-time", "-1"], "latency_time"),
    "zero --latency-batch-size": (["--latency", "--latency-batch-size", "0"], "latency_batch_size"),
    "baseline not a model": (["--latency", "--baseline", "{data}"], "config.json"),
    "model not a model": (["--latency", "--model", "{data}"], "config.json"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_evaluate_latency_bad_input(case, world, capsys):
    extra, needle = BAD[case]
    extra = [x.format(model=world / "model", data=world / "data") for x in extra]
    argv = ["evaluate", "--model", str(world / "model"), "--task", "retrieval", "--data", str(world / "data"), *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upop: error:") and needle in err[0], err


RETIME = [  # retime_command arguments -> what the CLI parses from the command
    dict(model="out dir/compressed", baseline="dense", task="retrieval", data="my data", batch=4, seconds=0.25),
    dict(model="c", baseline=None, task="vqa", data="d", batch=1, seconds=0.5, precision="bf16", tf32=False),
]


@pytest.mark.parametrize("kw", RETIME)
def test_the_retime_command_parses_back(kw):
    from upop.cli.main import build_parser
    from upop.runs.report import retime_command

    args = build_parser().parse_args(shlex.split(retime_command(**kw))[1:])
    assert args.command == "evaluate" and args.latency
    assert (args.model, args.baseline, args.task, args.data) == (kw["model"], kw["baseline"], kw["task"], kw["data"])
    assert (args.latency_batch_size, args.latency_time) == (kw["batch"], kw["seconds"])
    assert (args.eval_precision or "fp32", args.tf32 is not False) == (kw.get("precision", "fp32"), kw.get("tf32", True))


def test_time_models_pairs_modules_with_an_injected_timer(world):
    import upop
    from upop.models.folders import load_any

    model, processor = load_any(world / "model")
    baseline, _ = load_any(world / "model")
    timer = Script({id(model): [2.0, 2.0, 2.2, 2.0, 1.9, 2.0, 2.1], id(baseline): [4.0] * 7})
    result = upop.time_models(model, baseline, task="retrieval", data=world / "data", processor=processor,
                              batch_size=3, timer=timer)
    assert result["latency_ms"] == {"model": 2.0, "baseline": 4.0} and result["speedup"] == 2.0
    assert result["latency_noisy"] is False and result["batch"] == 3 and result["rounds"] == 7
    timed = timer.calls[2 * upop.measure.latency.WARMUP:]
    assert [m is model for m, _ in timed[:4]] == [True, False, False, True], "model first, then baseline first"
