"""Where the batch-1 time of compressed CLIP goes: the text tower and the vision tower (ViT-B/16)
of a random CLIP ViT-B/16, dense and pruned 2x / 4x with upop's defaults (the widths of
``speed.py``), profiled on the CPU at batch 1 (and 32 for reference).

    python benchmarks/profile_batch1.py            # CLIP ViT-B/16: text batch 1, 32; vision 1, 8 (~10 min)
    python benchmarks/profile_batch1.py --modes inference_mode compiled   # + the two run-time fixes (~15 min)
    python benchmarks/profile_batch1.py --quick    # the demo CLIP, batch 1, short timings (CI)

Per variant: the median latency (interleaved rounds: every round times each variant in turn, the
order alternating; speedups are the median per-round ratio to dense), the FLOPs reduction, the
realized speedup / FLOPs reduction, and a ``torch.profiler`` breakdown of one forward: the self
time of the ATen ops by category and the time outside any op (Python, module calls, dispatch:
the profiled wall time minus the op time; the profiler adds a few microseconds to every op, so
the profiled numbers are above the unprofiled latency, and the split is what matters).

More variants explain and attack the gap:
- "floor": every group pruned to 1 unit. It keeps what pruning cannot remove (embeddings,
  layernorms, residual adds, softmax over the unchanged token count, and the per-op and per-module
  cost of every call), so its latency is the fixed part. An Amdahl model then predicts each
  variant's latency as ``floor + (dense - floor) x (prunable FLOPs kept)`` and so its realized /
  FLOPs ratio; what the model misses is the lower efficiency of narrow matrix products.
- "4x heads": 4x with ``granularity="head"`` (whole heads removed, head_dim kept at 64), the
  user-side alternative to narrow heads.
- ``--modes``: dense and 4x under ``torch.inference_mode()`` (less autograd bookkeeping per op)
  and/or ``torch.compile`` (fuses ops, removes the Python module calls; batch 1 only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clip_b16_config, write_results  # noqa: E402
from speed import PARTS, bound, floor_model, inputs_for  # noqa: E402

import upop  # noqa: E402
from upop.search.mask_search import UPopSearch, resolve_round_to  # noqa: E402

CATEGORIES = ("linear/matmul", "attention (sdpa)", "layernorm", "activation", "softmax", "elementwise",
              "reshape/view/copy", "embedding/patch conv", "other")
_MATMUL = {"addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv", "dot", "_addmm_activation"}
_ACT = {"gelu", "relu", "silu", "sigmoid", "tanh", "quick_gelu", "gelu_", "relu_"}
_VIEW = {"view", "reshape", "_reshape_alias", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "copy_",
         "expand", "as_strided", "t", "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "flatten",
         "alias", "detach", "cat", "chunk", "narrow", "to", "_to_copy", "empty_like", "lift_fresh", "view_as",
         "expand_as", "stack"}
_EMBED = {"embedding", "index_select", "conv2d", "convolution", "_convolution", "mkldnn_convolution",
          "_nnpack_spatial_convolution", "slow_conv2d_forward", "_slow_conv2d_forward", "thnn_conv2d"}
_ELEMENTWISE = {"add", "mul", "div", "sub", "rsub", "pow", "where", "masked_fill", "eq", "ne", "lt", "gt", "add_",
                "mul_", "div_", "neg", "exp", "sqrt", "rsqrt", "mean", "sum", "norm", "linalg_vector_norm", "fill_",
                "masked_fill_", "logical_not", "bitwise_not", "__and__", "__or__"}


def category(op: str) -> str:
    """The category of an ATen op name (``aten::addmm`` -> ``linear/matmul``)."""
    name = op.split("::", 1)[-1]
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention (sdpa)"
    if name in _MATMUL:
        return "linear/matmul"
    if "layer_norm" in name:
        return "layernorm"
    if "softmax" in name:
        return "softmax"
    if name in _ACT or "gelu" in name:
        return "activation"
    if name in _EMBED or "conv" in name:
        return "embedding/patch conv"
    if name in _VIEW:
        return "reshape/view/copy"
    if name in _ELEMENTWISE:
        return "elementwise"
    return "other"


def compress(model, ratio: float, granularity: str = "head-dim", seed: int = 0):
    """A copy of ``model`` pruned with upop's defaults (``round_to="auto"``, budget in params) over
    random scores, as ``speed.py`` does (same widths for head-dim units)."""
    pruned = copy.deepcopy(model)
    groups = upop.find_groups(pruned, granularity=granularity)
    masks = upop.attach_masks(pruned, groups=groups)
    round_to, _ = resolve_round_to("auto", masks.groups)
    g = torch.Generator().manual_seed(seed)
    for name in masks.keys():
        masks.grad_sum[name] = torch.randn(masks[name].numel(), generator=g, dtype=torch.float64)
    UPopSearch(masks, ratio=ratio, total_steps=1, interval=1, round_to=round_to, method="one-shot").update(0)
    upop.prune(pruned, masks)
    return pruned.eval()


MODES = {"inference_mode": "run under torch.inference_mode() instead of torch.no_grad()",
         "compiled": "the forward under torch.compile (inductor; batch 1 only)"}


def build_variants(dense, modes=()) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, model, mode) of every variant: ``"eager"``, or one of :data:`MODES` (dense and 4x)."""
    out = [("dense", dense, "eager"), ("2x", compress(dense, 0.5), "eager"), ("4x", compress(dense, 0.75), "eager"),
           ("4x heads", compress(dense, 0.75, granularity="head"), "eager"),
           ("floor", floor_model(dense), "eager")]
    for mode in modes:
        out += [(f"dense {mode}", dense, mode), (f"4x {mode}", out[2][1], mode)]
    return out


def _in_inference_mode(fn):
    def call(model, x):
        with torch.inference_mode():
            return fn(model, x)
    return call


def _once(fn, model, x) -> float:
    start = time.perf_counter()
    fn(model, x)
    return 1e3 * (time.perf_counter() - start)


@torch.no_grad()
def time_variants(calls, x, rounds: int, reps: int) -> dict[str, list[float]]:
    """Per variant, its median ms in each round; ``calls``: name -> (fn, model). Rounds alternate
    the order, so a burst of load hits every variant alike."""
    names = list(calls)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn, model = calls[n]
            per_round[n].append(statistics.median(_once(fn, model, x) for _ in range(reps)))
    return per_round


@torch.no_grad()
def profile(fn, model, x, reps: int) -> dict:
    """One profiled run of ``reps`` forwards: per forward, the ATen self ms by category, the op
    calls (nested ones included), the profiled wall ms and the wall time outside every op."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    # one recorded-nothing warm-up step: the first op of a session carries the profiler's start-up
    with torch_profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=reps),
                       acc_events=True) as prof:
        fn(model, x)
        prof.step()
        wall = 0.0
        for _ in range(reps):
            wall += _once(fn, model, x) / reps
            prof.step()
    ms = {c: 0.0 for c in CATEGORIES}
    calls = 0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ms[category(event.key)] += event.self_cpu_time_total / 1e3 / reps
            calls += event.count
    return {"ms": ms, "op_calls": calls // reps, "wall_ms": wall, "outside_ms": max(0.0, wall - sum(ms.values()))}


def profile_variants(calls, x, rounds: int, reps: int) -> dict[str, dict]:
    """:func:`profile` of every variant in interleaved rounds (after one discarded run, as the
    profiler's first session is slow); every number is the median over the rounds."""
    profile(*next(iter(calls.values())), x, 1)
    runs: dict[str, list[dict]] = {n: [] for n in calls}
    for r in range(rounds):
        for n in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            runs[n].append(profile(*calls[n], x, reps))
    med = statistics.median
    return {n: {"ms": {c: med(p["ms"][c] for p in ps) for c in CATEGORIES}, "op_calls": ps[0]["op_calls"],
                "wall_ms": med(p["wall_ms"] for p in ps), "outside_ms": med(p["outside_ms"] for p in ps)}
            for n, ps in runs.items()}


def measure(part: str, batch: int, variants, dense, args) -> list[dict]:
    """Every variant of one tower at one batch: latency, FLOPs, profile, Amdahl prediction."""
    x = inputs_for(dense, batch)
    base = PARTS[part]
    if batch > 1:  # compiling takes about a minute per model and batch: batch 1 is the question
        variants = [v for v in variants if v[2] != "compiled"]
    calls = {}
    wrap = {"eager": lambda f: f, "inference_mode": _in_inference_mode,
            "compiled": lambda f: torch.compile(f, dynamic=False)}
    for name, model, mode in variants:
        calls[name] = (wrap[mode](base), model)
    with torch.no_grad():  # warm-up (and compilation); a second call unless the first took over a second
        warm = {n: _once(fn, m, x) for n, (fn, m) in calls.items()}
        warm = {n: min(t, _once(*calls[n], x)) if t < 1e3 else t for n, t in warm.items()}
    reps = max(1, min(args.reps, round(args.round_seconds * 1e3 / warm["dense"])))
    total = reps * sum(warm.values()) / 1e3
    rounds = max(3, min(args.rounds, int(args.seconds / max(total, 1e-9))))
    per_round = time_variants(calls, x, rounds, reps)
    # a mode changes how, not what, is computed: its variant has the eager one's FLOPs
    eager = {n: upop.count_flops(m, x, forward=base) for n, m, mode in variants if mode == "eager"}
    flops = {n: eager[n if mode == "eager" else n.split(" ")[0]] for n, _, mode in variants}
    profiles = profile_variants(calls, x, min(args.profile_rounds, rounds), max(1, min(args.profile_reps, reps)))
    rows = []
    for name, model, mode in variants:
        ms, prof = statistics.median(per_round[name]), profiles[name]
        ref = "dense" if mode == "eager" else f"dense {mode}"
        speedup = statistics.median(d / v for d, v in zip(per_round[ref], per_round[name]))
        rows.append({"part": part, "batch": batch, "variant": name, "latency_ms": ms, "rounds": rounds,
                     "reps_per_round": reps, "mode": mode, "speedup": speedup, "flops": flops[name],
                     "flops_ratio": flops["dense"] / flops[name], "params": upop.count_params(model),
                     "speedup_over_flops_ratio": speedup / (flops["dense"] / flops[name]),
                     "profile_ms": prof["ms"], "op_ms": sum(prof["ms"].values()), "profiled_ms": prof["wall_ms"],
                     "outside_ops_ms": prof["outside_ms"], "op_calls": prof["op_calls"]})
    _amdahl(rows)
    return rows


def _amdahl(rows: list[dict]) -> None:
    """Add the Amdahl prediction to the eager rows: latency = floor + (dense - floor) x the share
    of the prunable FLOPs kept (the floor model's FLOPs are the part pruning cannot remove)."""
    by = {r["variant"]: r for r in rows}
    dense, floor = by["dense"], by["floor"]
    fixed = floor["latency_ms"] / dense["latency_ms"]
    for r in rows:
        r["fixed_share"] = fixed
        if r["mode"] != "eager":
            r["amdahl_speedup"] = r["amdahl_ratio"] = None
            continue
        r["amdahl_speedup"] = bound(r["flops"], {"ms": dense["latency_ms"], "flops": dense["flops"]},
                                    {"ms": floor["latency_ms"], "flops": floor["flops"]})
        r["amdahl_ratio"] = r["amdahl_speedup"] / r["flops_ratio"]


def markdown(label: str, rows: list[dict], threads: int, layers: dict[str, int]) -> str:
    out = [f"## Where the batch-1 time of compressed CLIP goes ({label}, CPU, {threads} threads)", "",
           "Realized speedup vs FLOPs reduction, and what an Amdahl model with the measured fixed part "
           "(the \"floor\" model: every group at 1 unit) predicts.", "",
           "| part | batch | variant | latency (ms) | speedup | FLOPs reduction | speedup / FLOPs | Amdahl speedup "
           "| Amdahl speedup / FLOPs | fixed share |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        amdahl = (f"{r['amdahl_speedup']:.2f}x | {r['amdahl_ratio']:.2f}" if r["amdahl_speedup"] is not None
                  else "- | -")
        out.append(f"| {r['part']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.2f} | {r['speedup']:.2f}x | "
                   f"{r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.2f} | {amdahl} | "
                   f"{r['fixed_share']:.2f} |")
    out += ["", "Profile of one forward (ms of ATen self time per category; \"outside ops\": the profiled wall "
            "time minus all op time, i.e. Python, module calls and dispatch; profiled wall: with the profiler's "
            "own cost per op; op calls: ATen calls per forward, nested ones included).", "",
            "| part | batch | variant | " + " | ".join(CATEGORIES) + " | outside ops | profiled wall | op calls |",
            "|---|---:|---|" + "---:|" * (len(CATEGORIES) + 3)]
    for r in rows:
        cells = " | ".join(f"{r['profile_ms'][c]:.2f}" for c in CATEGORIES)
        out.append(f"| {r['part']} | {r['batch']} | {r['variant']} | {cells} | {r['outside_ops_ms']:.2f} | "
                   f"{r['profiled_ms']:.2f} | {r['op_calls']} |")
    out += ["", "Fixed part (the floor model) per tower and batch:", ""]
    for r in rows:
        if r["variant"] == "floor":
            dense = next(d for d in rows
                         if d["variant"] == "dense" and d["part"] == r["part"] and d["batch"] == r["batch"])
            per_layer = r["latency_ms"] / layers[r["part"]]
            out.append(f"- {r['part']}, batch {r['batch']}: {r['latency_ms']:.2f} ms = "
                       f"{100 * r['fixed_share']:.0f}% of dense ({per_layer:.2f} ms per layer); "
                       f"{r['op_calls']} ATen calls per forward "
                       f"(dense: {dense['op_calls']}); outside ops {100 * r['outside_ops_ms'] / r['profiled_ms']:.0f}% "
                       "of its profiled time")
    out += ["", "Medians over interleaved rounds on a shared machine (other processes were running); "
            "speedups are the median per-round ratio to the dense model (variants run another way: to the dense "
            "model run that way). Widths: upop's defaults over random scores, as in `speed.py`."]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo CLIP, batch 1, short timings")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="text batches (default 1 32; quick 1)")
    parser.add_argument("--vision-batches", type=int, nargs="+", default=None,
                        help="vision batches (default 1 8: a batch-32 ViT-B/16 forward takes 10+ s here; quick 1)")
    parser.add_argument("--parts", nargs="+", default=["text", "vision"], choices=["text", "vision"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads contend and run slower)")
    parser.add_argument("--rounds", type=int, default=None, help="most interleaved rounds (default 25; quick 3)")
    parser.add_argument("--reps", type=int, default=5, help="most forwards per variant per round")
    parser.add_argument("--round-seconds", type=float, default=0.3, help="aim of a dense model's time per round")
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per part and batch "
                        "(rounds are cut to fit, at least 3; default 30, quick 1)")
    parser.add_argument("--profile-reps", type=int, default=3, help="most forwards per profiled run")
    parser.add_argument("--profile-rounds", type=int, default=None, help="profiled runs per variant (default 5; "
                        "quick 1)")
    parser.add_argument("--modes", nargs="+", default=[], choices=sorted(MODES),
                        help="add dense and 4x run another way: " + "; ".join(f"{k}: {v}" for k, v in MODES.items()))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (3 if args.quick else 25)
    args.seconds = args.seconds or (1.0 if args.quick else 30.0)
    args.profile_rounds = args.profile_rounds or (1 if args.quick else 5)
    batches = {"text": args.batches or ([1] if args.quick else [1, 32]),
               "vision": args.vision_batches or ([1] if args.quick else [1, 8])}
    torch.manual_seed(0)
    if args.quick:
        from upop.cli.demo import demo_model_path

        label, dense = "demo CLIP (64 wide, 4+4 layers, 64 px)", upop.load_model(demo_model_path())[0].eval()
    else:
        import transformers

        label, dense = "CLIP ViT-B/16 (224 px)", transformers.CLIPModel(clip_b16_config(224)).eval()
    variants = build_variants(dense, args.modes)
    rows = []
    for part in args.parts:
        for batch in batches[part]:
            for r in measure(part, batch, variants, dense, args):
                rows.append(r)
                amdahl = f"{r['amdahl_ratio']:.2f}" if r["amdahl_ratio"] is not None else "-"
                print(f"{part:6s} b{batch:<3d} {r['variant']:15s} {r['latency_ms']:9.2f} ms  speedup "
                      f"{r['speedup']:5.2f}x  FLOPs {r['flops_ratio']:5.2f}x  ratio {r['speedup_over_flops_ratio']:.2f}"
                      f"  Amdahl {amdahl}  outside ops {r['outside_ops_ms']:.2f} ms  ops {r['op_calls']}", flush=True)
    layers = {p: getattr(dense.config, f"{p}_config").num_hidden_layers for p in ("text", "vision")}
    write_results("profile_batch1" + ("-quick" if args.quick else ""),
                  {"rows": rows, "quick": args.quick, "model": label, "threads": args.threads, "modes": args.modes,
                   "shared_machine": True}, markdown(label, rows, args.threads, layers))


if __name__ == "__main__":
    main()
