"""One prepared device check: every configuration's training and prediction path on the device
(AMP on), the latencies the field quotes, and a GPU-hours estimate of the MVTec AD grid.

    python benchmarks/gpu_check.py --budget-s 480                 # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --budget-s 120    # anywhere (what the tests run)

Stages, each stopped by the time budget (what did not fit is listed as skipped):

1. device: torch, CUDA, the GPU and whether it has bfloat16;
2. smoke: every registered configuration (or ``--models``) at its smoke-test size
   (:mod:`adlib.models.smoke`, random-init weights) trains a few steps through the one loop
   with AMP and predicts; pass / fail with the error;
3. latency: EfficientAD-S/M, PatchCore, PaDiM, Dinomaly-base and a flow at ``--latency-size``
   (256) with their full architectures (random weights), batch 1 and 32, fp32 and AMP: median
   after warm-up, CUDA-synchronised;
4. schedule: per configuration at its registered architecture, the time per training step and
   per test image over a short schedule, extrapolated to the registered budget on an MVTec-sized
   category (242 training / 115 test images) and to the 15-category grid in GPU-hours.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. Random weights give meaningless
accuracy: only pass/fail and times are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

#: what the latency stage measures (glob patterns; the first registered match of each)
LATENCY_MODELS = ("efficientad-small", "efficientad-medium", "patchcore", "padim", "dinomaly-base-224",
                  "cflow-resnet18|fastflow-resnet18")
#: an MVTec AD category on average (3,629 training and 1,725 test images over 15 categories)
MVTEC_TRAIN, MVTEC_TEST, MVTEC_CATEGORIES = 242, 115, 15


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class OutOfTime(Exception):
    """The budget ran out in the middle of one item."""


@contextlib.contextmanager
def stop_after(seconds: float):
    """Interrupt the block with :class:`OutOfTime` after ``seconds`` (main thread, Unix)."""
    def ring(signum, frame):
        raise OutOfTime(f"stopped after {seconds:.0f} s (budget)")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synthetic_images(n: int, size: int, seed: int = 0):
    """Normal-looking images: noisy ramps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, size).view(1, 1, 1, size).expand(n, 3, size, size)
    return (ramp * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
            + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _loader(images, batch_size: int):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Items(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image": images[i], "label": 0, "mask": torch.zeros(1, *images.shape[-2:]), "index": i}

    return DataLoader(Items(), batch_size=batch_size, shuffle=True, drop_last=len(images) > batch_size,
                      generator=torch.Generator().manual_seed(0))


def _aux(model, size: int, batch: int):
    """Endless random batches for every declared auxiliary stream (no folders needed)."""
    import torch

    def endless(n, side):
        g = torch.Generator().manual_seed(1)
        while True:
            yield torch.rand(n, 3, side, side, generator=g)

    return {s.name: endless(s.batch_size or batch, s.size or size) for s in model.auxiliary_streams()}


def train_briefly(name: str, overrides: dict, device, *, steps: int, n_images: int, amp: bool = True):
    """Build ``name`` (random weights), train it ``steps`` steps through the one loop; return
    (model, fit report, config)."""
    import torch

    from adlib.models.base import FitContext
    from adlib.models.registry import build_model, resolve_config
    from adlib.training import FitData, fit

    config = resolve_config(name, **{**overrides, "max_steps": steps})
    model = build_model(config, pretrained=False)
    size, batch = int(config.train["center_crop"] or config.train["img_size"]), int(config.train["batch_size"])
    images = synthetic_images(max(n_images, batch), int(config.train["img_size"]))
    if config.train["center_crop"]:
        offset = (int(config.train["img_size"]) - size) // 2
        images = images[..., offset:offset + size, offset:offset + size].contiguous()
    data = FitData(_loader(images, batch), _loader(images[: max(2, n_images // 4)], batch),
                   _aux(model, size, batch))
    context = FitContext(device=torch.device(device), seed=0, img_size=size)
    report = fit(model, data, context, num_epochs=config.train["num_epochs"], max_steps=steps, amp=amp,
                 grad_clip_norm=config.train.get("grad_clip_norm"), progress=False)
    return model, report, config


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_predict(model, images, device, *, amp: bool, repeats: int = 5) -> float:
    """Median milliseconds per image of ``model.predict(images)`` after two warm-up calls."""
    import torch

    images = images.to(device)
    cuda = str(device).startswith("cuda")
    times = []
    with torch.no_grad(), torch.autocast(device_type="cuda" if cuda else "cpu", enabled=amp and cuda):
        for i in range(repeats + 2):
            _sync(device)
            start = time.perf_counter()
            model.predict(images)
            _sync(device)
            if i >= 2:
                times.append(1000.0 * (time.perf_counter() - start) / len(images))
    return statistics.median(times)


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def smoke_stage(names, device, budget: Budget, steps: int) -> tuple[list[dict], list[str]]:
    from adlib.models.smoke import smoke_overrides

    rows, skipped = [], []
    for name in names:
        if budget.left() < 5:
            skipped.append(f"smoke {name}")
            continue
        start = time.perf_counter()
        try:
            with stop_after(budget.left()):
                model, report, config = train_briefly(name, smoke_overrides(name), device, steps=steps, n_images=8)
                size = int(config.train["center_crop"] or config.train["img_size"])
                out = model.predict(synthetic_images(2, size, seed=3).to(device))
            import torch

            ok = bool(torch.isfinite(out.scores).all()) and (out.maps is None or bool(torch.isfinite(out.maps).all()))
            rows.append({"model": name, "status": "pass" if ok else "fail", "steps": report.steps,
                         "seconds": round(time.perf_counter() - start, 2),
                         "error": "" if ok else "non-finite scores or maps"})
        except OutOfTime:
            skipped.append(f"smoke {name} (budget ran out while it ran)")
            continue
        except Exception as err:  # noqa: BLE001 - every failure is a result here
            rows.append({"model": name, "status": "fail", "steps": 0, "seconds": round(time.perf_counter() - start, 2),
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                         "traceback": traceback.format_exc(limit=6)})
        print(f"smoke {name}: {rows[-1]['status']} {rows[-1]['error']}", flush=True)
    return rows, skipped


def latency_stage(registered, device, budget: Budget, size: int, batches: tuple[int, ...]) -> tuple[list[dict], list[str]]:
    import torch

    rows, skipped = [], []
    cuda = device.startswith("cuda")
    for patterns in LATENCY_MODELS:
        name = next((n for p in patterns.split("|") for n in registered if fnmatch.fnmatch(n, p)), None)
        if name is None:
            skipped.append(f"latency {patterns} (not registered or not selected)")
            continue
        if budget.left() < 20:
            skipped.append(f"latency {name} (budget)")
            continue
        try:
            from adlib.models.registry import resolve_config

            crop = resolve_config(name).train.get("center_crop")
            overrides = {"img_size": size} if not crop else {}
            with stop_after(budget.left()):
                model, _, config = train_briefly(name, overrides, device, steps=1, n_images=max(batches))
            side = int(config.train["center_crop"] or config.train["img_size"])
            for batch in batches:
                images = synthetic_images(batch, side, seed=5)
                for amp in ((False, True) if cuda else (False,)):
                    if budget.left() < 5:
                        skipped.append(f"latency {name} b{batch} amp={amp} (budget)")
                        continue
                    with stop_after(budget.left()):
                        ms = time_predict(model, images, device, amp=amp)
                    rows.append({"model": name, "size": side, "batch": batch, "precision": "amp" if amp else "fp32",
                                 "ms_per_image": round(ms, 3)})
                    print(f"latency {name} {side}px b{batch} {'amp' if amp else 'fp32'}: {ms:.2f} ms/image", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
        except OutOfTime:
            skipped.append(f"latency {name} (budget ran out while it ran)")
        except Exception as err:  # noqa: BLE001
            rows.append({"model": name, "size": size, "batch": None, "precision": None, "ms_per_image": None,
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
    return rows, skipped


def schedule_stage(names, device, budget: Budget, steps: int, size_cap: int | None) -> tuple[list[dict], list[str]]:
    """Time per step and per test image at the registered architecture; extrapolate to MVTec."""
    import torch

    from adlib.models.smoke import smoke_overrides

    rows, skipped = [], []
    for name in names:
        if budget.left() < 20:
            skipped.append(f"schedule {name} (budget)")
            continue
        try:
            from adlib.models.registry import resolve_config

            registered = resolve_config(name).train
            overrides = {} if size_cap is None else {**smoke_overrides(name), "max_steps": steps}
            with stop_after(budget.left()):
                model, report, config = train_briefly(name, overrides, device, steps=steps,
                                                      n_images=2 * int(config_batch(name, overrides)))
                side = int(config.train["center_crop"] or config.train["img_size"])
                batch = int(config.train["batch_size"])
                ms = time_predict(model, synthetic_images(min(batch, 32), side, seed=7), device,
                                  amp=device.startswith("cuda"), repeats=3)
            fit_s = report.fit_seconds
            per_step = fit_s / max(report.steps, 1)
            if model.learns_by == "one_pass":
                images_seen = max(report.passes.get("fit", 1), 1)
                fit_category = fit_s / images_seen * MVTEC_TRAIN
                budget_steps = 0
            else:
                per_epoch = math.ceil(MVTEC_TRAIN / batch)
                epochs, max_steps = registered["num_epochs"], registered["max_steps"]
                budget_steps = min(b for b in (epochs * per_epoch if epochs else None, max_steps) if b is not None)
                fit_category = per_step * budget_steps
            test_category = ms / 1000.0 * MVTEC_TEST
            rows.append({"model": name, "size": side, "batch": batch, "steps_timed": report.steps,
                         "s_per_step": round(per_step, 4), "ms_per_test_image": round(ms, 3),
                         "registered_steps": budget_steps, "fit_s_per_category": round(fit_category, 1),
                         "test_s_per_category": round(test_category, 1),
                         "grid_gpu_h": round(MVTEC_CATEGORIES * (fit_category + test_category) / 3600.0, 3)})
            print(f"schedule {name}: {per_step:.3f} s/step, {ms:.2f} ms/test image -> "
                  f"{rows[-1]['grid_gpu_h']:.2f} h for the grid", flush=True)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        except OutOfTime:
            skipped.append(f"schedule {name} (budget ran out while it ran)")
        except Exception as err:  # noqa: BLE001
            rows.append({"model": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
    return rows, skipped


def config_batch(name: str, overrides: dict) -> int:
    from adlib.models.registry import resolve_config

    return int(resolve_config(name, **overrides).train["batch_size"])


def markdown(result: dict) -> str:
    lines = ["# Device check", "", "```", json.dumps(result["device"], indent=1), "```", "",
             f"Budget {result['budget_s']} s, used {result['elapsed_s']:.0f} s.", "", "## Smoke (AMP on)", "",
             "| model | status | steps | s | error |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['status']} | {r['steps']} | {r['seconds']} | {r['error']} |" for r in result["smoke"]]
    lines += ["", "## Latency (ms per image, median after warm-up)", "", "| model | px | batch | precision | ms/image |",
              "|---|---:|---:|---|---:|"]
    lines += [f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | {r['ms_per_image']} |"
              for r in result["latency"]]
    lines += ["", "## Schedule and the 15-category MVTec AD grid", "",
              "| model | px | batch | s/step | ms/test image | registered steps | fit s/category | test s/category "
              "| grid GPU-h |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["schedule"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['s_per_step']} | {r['ms_per_test_image']} "
                         f"| {r['registered_steps']} | {r['fit_s_per_category']} | {r['test_s_per_category']} "
                         f"| {r['grid_gpu_h']} |")
    total = sum(r.get("grid_gpu_h", 0) for r in result["schedule"])
    lines += ["", f"Grid total over the configurations timed: **{total:.1f} GPU-hours** (one seed).", "",
              "## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + ([] if result["skipped"] else ["(nothing)"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--models", nargs="*", help="glob patterns of configurations (default: all)")
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--smoke-steps", type=int, default=2)
    parser.add_argument("--latency-size", type=int, default=256)
    parser.add_argument("--latency-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--schedule-steps", type=int, default=10)
    parser.add_argument("--schedule-smoke-size", action="store_true",
                        help="time the schedule at smoke-test sizes (quick CPU runs; figures then mean little)")
    parser.add_argument("--stages", nargs="+", default=["smoke", "latency", "schedule"])
    args = parser.parse_args(argv)

    start = time.monotonic()
    budget = Budget(args.budget_s)
    from adlib.models.registry import list_models
    from adlib.training import resolve_device

    device = str(resolve_device(args.device))
    registered = list_models()
    names = [n for n in registered if not args.models or any(fnmatch.fnmatch(n, p) for p in args.models)]
    result = {"device": device_info(device), "budget_s": args.budget_s, "smoke": [], "latency": [], "schedule": [],
              "skipped": []}
    print(json.dumps(result["device"]), flush=True)
    # each stage gets at most its share of what is left, so a slow one does not starve the rest
    shares = {"smoke": 0.4, "latency": 0.3, "schedule": 1.0}
    for stage in ("smoke", "latency", "schedule"):
        if stage not in args.stages:
            continue
        stage_budget = Budget(max(budget.left() * shares[stage], 0))
        if stage == "smoke":
            rows, skipped = smoke_stage(names, device, stage_budget, args.smoke_steps)
        elif stage == "latency":
            rows, skipped = latency_stage([n for n in registered if n in names] or registered, device, stage_budget,
                                          args.latency_size, tuple(args.latency_batches))
        else:
            rows, skipped = schedule_stage(names, device, stage_budget, args.schedule_steps,
                                           64 if args.schedule_smoke_size else None)
        result[stage], result["skipped"] = rows, result["skipped"] + skipped
    result["elapsed_s"] = time.monotonic() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    failed = [r["model"] for r in result["smoke"] if r["status"] != "pass"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
