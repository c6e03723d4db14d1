"""Device-to-host syncs per training step (:mod:`upop.measure.host_sync`).

The counter first (what it counts, and what it knows to be on the host on a CPU run), then the
table over every (tiny model, task) pair the registry declares (:func:`upop.arch.pairs`): a short
run (search, prune, retraining) under :func:`upop.measure.host_sync.count_steps`, with no
checkpoint and no progress line inside its steps. Every step waits for the device exactly once:
the step loop reads the run's agreement on the loss (:meth:`upop.engine.run.Run.forward`) together
with what the callbacks ask for (the search's accumulated scores on an update step) in one
transfer (:func:`upop.engine.loop.read_together`); the steps' ends (validation) are not bounded. Syncs made inside another library or by code that does them by
design are listed in :data:`ELSEWHERE` with the reason; any other one fails the table.

The first pair runs in the default suite (5-10 s); the others are ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from upop.engine.loop import LoopCallback, StepLoop
from upop.measure.host_sync import DeviceBatch, HostSyncCounter, count_steps, count_syncs, host_value

from .test_kill_resume import folders  # noqa: F401 (the fixture: tiny models and Shapes data, shared)

#: the one sync a step may make: the step loop's read of the forward's values (loss, non-finite
#: check and stop requests) with what the callbacks asked for (the search's sums on an update step)
STEP_READ = "engine/loop.py read_together"
#: syncs made elsewhere, by where they are made (``file function``, in upop or in a library): why
ELSEWHERE = {
    "transformers/masking_utils.py _ignore_causal_mask_sdpa": "transformers reads a padding mask to skip "
                                                              "building the attention mask for SDPA",
    "transformers/masking_utils.py _ignore_bidirectional_mask_sdpa": "the same, for a bidirectional mask",
    "transformers/models/llava/modeling_llava.py get_placeholder_mask": "transformers formats the count of image "
                                                                        "tokens into its check's message, eagerly",
    "transformers/utils/import_utils.py torch_compilable_check": "transformers checks SigLIP2's spatial_shapes "
                                                                 "(TRANSFORMERS_DISABLE_TORCH_CHECK=1 turns it off)",
}


def _counts(fn, *args) -> int:
    return count_syncs(fn, *args)[1].count


# the counter ---------------------------------------------------------------------------------
READS = {
    "item": lambda t: t.sum().item(),
    "float": lambda t: float(t.sum()),
    "int": lambda t: int(t.sum()),
    "bool": lambda t: bool(t.sum() > 0),
    "format": lambda t: f"{t.sum():.3f}",
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "to cpu": lambda t: t.to("cpu"),
    "numpy": lambda t: t.numpy(),
    "nonzero": lambda t: t.nonzero(),
    "torch.nonzero": lambda t: torch.nonzero(t),
    "mask index": lambda t: t[t > 0],
    "mask assign": lambda t: t.__setitem__(t > 0, 0.0),
    "where(cond)": lambda t: torch.where(t > 0),
    "unique": lambda t: t.unique(),
    "equal": lambda t: torch.equal(t, t),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_a_read_of_a_device_tensor_is_one_sync(name):
    """A tensor from outside the counted block is on the device: reading it is a sync; the same
    read of a tensor made on the host inside the block is not."""
    device = torch.arange(6, dtype=torch.float32) - 2
    assert _counts(READS[name], device) == 1

    def host():
        return READS[name](torch.arange(6, dtype=torch.float32) - 2)

    assert _counts(host) == 0


def test_host_and_device_tensors_are_followed():
    counter = HostSyncCounter("cpu")
    outside = torch.ones(3)
    with counter:
        made = torch.tensor([1.0, 2.0, 3.0])  # no device: on the host
        moved = made.to(outside.device)  # to the run's device: a device tensor (another one, as on CUDA)
        assert moved is not made and counter.on_host(made) and not counter.on_host(moved)
        assert not counter.on_host(torch.zeros(3, device=outside.device))  # made on the run's device
        back = (outside * 2).cpu()  # one sync; what is computed from it stays on the host
        assert counter.on_host(back) and counter.on_host(back + made)
        assert not counter.on_host(back + moved)  # a device operand: a device result
        float(back.sum()), made.tolist(), int(made[0])
        mask = moved > 1
        moved[1] = 5.0  # an index of ints, not of bools: no sync
        moved.masked_fill_(mask, 0.0)  # no sync
    assert counter.count == 1 and [n for n in counter.sites.values()] == [1]
    assert "test_host_sync.py" in next(iter(counter.sites))  # where the read was made


def test_the_optimizers_host_side_step_counters_are_not_syncs():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    assert _counts(step) == 0
    assert _counts(step) == 0  # with its state from the step before


def test_host_value_reads_the_collated_batch():
    collated = {"index": torch.arange(4), "pixels": torch.ones(4, 3)}
    on_device = {k: v.clone() for k, v in collated.items()}
    batch = DeviceBatch(on_device, collated)
    index, counter = count_syncs(host_value, batch, "index")
    assert index is collated["index"] and counter.count == 0
    index, counter = count_syncs(host_value, dict(on_device), "index")  # no collated copy: read back
    assert torch.equal(index, collated["index"]) and counter.count == 1


def test_count_steps_counts_each_step_of_the_step_loop():
    """The plain loop (one process, no run) reads its task loss once a step; the count of each
    step comes apart from its end (``step_end``), and nothing is counted outside the block."""
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class End(LoopCallback):
        def step_end(self, done, stop):
            float(model.weight.detach().sum())  # e.g. a validation: counted in the end, not the step

    loop = StepLoop("train", model, optimizer, lambda m, b: (m(b["x"]).pow(2).mean(), None), callbacks=[End()])
    batches = [{"x": torch.randn(2, 4)} for _ in range(3)]
    with count_steps() as watch:
        loop.run(0, 3, batches)
    loop.step(3, batches[0])  # outside: not counted
    assert [(s.step, s.part, s.count) for s in watch.steps] == [(i, part, 1) for i in range(3)
                                                                 for part in ("step", "end")]
    assert all(list(s.sites) == [next(iter(s.sites))] and _where(next(iter(s.sites))) == STEP_READ
               for s in watch.counts("train").values())


# every (tiny model, task) pair ---------------------------------------------------------------
def _cases() -> list:
    from upop.arch import pairs

    return [pytest.param(model, task, marks=[] if i == 0 else [pytest.mark.slow], id=f"{model}-{task}")
            for i, (model, task) in enumerate(pairs())]


def _where(site: str) -> str:
    """``file function`` of a site (``tasks/x.py:3 in loss <- library/y.py:7 in check``: the
    library's, where the sync was made)."""
    place, function = site.split(" <- ")[-1].split(" in ")
    return f"{place.rsplit(':', 1)[0]} {function}"


@pytest.fixture
def one_thread():
    """torch on one thread while the test runs (the counter's work per call is Python: several
    threads only wait for each other, slowly, on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model, task", _cases())
def test_a_step_waits_for_the_device_at_most_once(model, task, folders, tmp_path, one_thread):  # noqa: F811
    import upop
    from upop.models.folders import load_any

    model_dir, data = folders(model, task)
    dense, processor = load_any(model_dir)
    config = upop.UPopConfig(search_epochs=1, retrain_epochs=1, batch_size=4, lr=1e-3, interval=2,
                             checkpoint_every=10**6, progress_every=86_400, latency_time=0.02, eval_batch_size=8)
    with count_steps() as watch:
        upop.compress(dense, task, data, processor=processor, config=config, out_dir=tmp_path / "out",
                      progress=False, log=lambda _: None)
    records = [json.loads(line) for line in Path(tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    updates = {r["step"] for r in records if r.get("phase") == "search" and "removed" in r}
    for phase in ("search", "retrain"):
        steps = watch.counts(phase)
        assert sorted(steps) == sorted(r["step"] for r in records if r.get("phase") == phase), phase
        for step, counted in steps.items():
            own = [_where(site) for site, n in counted.sites.items() for _ in range(n)
                   if _where(site) not in ELSEWHERE]
            assert own == [STEP_READ], (phase, step, counted.sites)
    assert updates, "the search updated its masks"
