"""PatchCore across coreset ratios on one data set: is "image AUROC falls with a larger coreset
while pixel AUROC rises" the method or a defect?

Default: ../shared/data/magnetic_tile, pip EfficientNet-Lite0 at 256 px, seed 0 (as the
metrics snapshot). Trains PatchCore twice through the run steps: once with the full bank and
once at the largest ratio asked for. The greedy k-center selection is incremental (its first
k picks do not depend on how many follow) and the bank is stored in selection order, so every
smaller ratio's coreset is a prefix of that bank. A third fit selects the coreset at
``--projection-ratio`` on the full features (``projection_dim=None``) instead of the 128-d
random projection. The test images are embedded once; per bank the script prints

* image AUROC with the paper's reweighting (Eq. 7, ``num_neighbors=9``) and without it (the
  largest patch distance ``s*``), pixel AUROC and AUPRO of the (same) maps;
* the reweighting factor (median and range over test images): ``1 - 1/9 = 0.889`` when the
  nearest item's neighbours are as close to the test patch as the nearest item itself;
* the median ``s*`` of normal and of anomalous test images, and how many test images score
  exactly like another one (ties);
* each bank's image AUROC minus that of the default coreset (0.1) on the same images, with a
  95% paired bootstrap interval (is a difference between ratios more than sampling error?).

    python benchmarks/bench_patchcore_ratios.py [--ratios 1.0 0.25 0.1 0.01]
    python benchmarks/bench_patchcore_ratios.py --max-train 250 --test-every 3   # a quicker look

``--max-train N`` trains on a seeded random N of the training images (bench_memory's subset),
``--test-every K`` scores every K-th test image (the search against a full bank is the
expensive part: test patches x all training patches).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_memory import keep_subset
from runner import add_data_options



def train_bank(manifest: Path, cache: Path, work: Path, name: str, overrides: dict, settings) -> tuple:
    """(fitted PatchCore, fit seconds) trained through :func:`adlib.run.train_run`."""
    from adlib import artifacts
    from adlib.run import train_run

    start = time.perf_counter()
    train_run(manifest, "patchcore", overrides, work / name, settings, cache_root=cache, progress=False)
    seconds = time.perf_counter() - start
    model, _ = artifacts.load_model(work / name, device=torch.device("cpu"))
    return model.eval(), seconds


def embed_test(model, manifest: Path, cache: Path, img_size: int, every: int = 1) -> tuple:
    """Test patch rows ``[B, h*w, D]``, grid, masks ``[B, H, W]`` bool and labels (every
    ``every``-th test image)."""
    from adlib.data import load_manifest
    from adlib.models.components.features import to_patch_rows
    from adlib.run.loaders import image_loader, split_of
    from adlib.settings import Settings

    frame = split_of(load_manifest(manifest), "test").iloc[::every].reset_index(drop=True)
    loader = image_loader(frame, {"img_size": img_size, "batch_size": 32}, cache, Settings(seed=0), shuffle=False)
    rows, masks = [], []
    with torch.no_grad():
        for batch in loader:
            emb = model.embed(batch["image"])
            b, _, h, w = emb.shape
            rows.append(to_patch_rows(emb).view(b, h * w, -1))
            masks.append(batch["mask"][:, 0] > 0.5)
    return torch.cat(rows), (h, w), torch.cat(masks), frame["label"].to_numpy()


def score_bank(model, bank: torch.Tensor, rows: torch.Tensor, grid: tuple, masks: torch.Tensor,
               labels: np.ndarray) -> dict:
    """Image and pixel metrics of one memory bank on the embedded test images."""
    from adlib.evaluation import PixelMetrics
    from adlib.evaluation.metrics import image_auroc
    from adlib.models.components.maps import gaussian_blur2d, upsample_map
    from adlib.models.patchcore import reweighted_scores

    model.memory_bank = bank
    search = model.bank_search()
    pixels, weighted, plain = PixelMetrics(), [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, rows.shape[0], 32):
            part = rows[i:i + 32]
            b, hw, d = part.shape
            dist, index = search.search(part.reshape(b * hw, d))
            patch, nearest = dist.view(b, hw), index.view(b, hw)
            weighted.append(reweighted_scores(patch, nearest, part, bank, model.num_neighbors))
            plain.append(patch.amax(dim=1))
            maps = gaussian_blur2d(upsample_map(patch.view(b, *grid), masks.shape[-2:]), model.blur_sigma)
            pixels.update(maps.numpy(), masks[i:i + 32].numpy())
    weighted, plain = torch.cat(weighted).numpy(), torch.cat(plain).numpy()
    factor = weighted / plain
    px = pixels.compute()
    return {"scores": weighted, "bank": int(bank.shape[0]), "image_auroc": image_auroc(labels, weighted),
            "image_auroc_s_star": image_auroc(labels, plain), "pixel_auroc": px["pixel_auroc"],
            "pixel_aupro": px["pixel_aupro"], "weight_median": float(np.median(factor)),
            "weight_min": float(factor.min()), "weight_max": float(factor.max()),
            "s_star_normal": float(np.median(plain[labels == 0])), "s_star_anomalous": float(np.median(plain[labels == 1])),
            "tied_images": int(len(weighted) - len(np.unique(weighted))), "score_s": time.perf_counter() - start}


def print_differences(scores: dict[str, np.ndarray], labels: np.ndarray, reference: str) -> None:
    """Each bank's image AUROC minus the reference bank's, with a 95% paired bootstrap interval."""
    from adlib.reporting.stats import paired_bootstrap_auroc_difference

    if reference not in scores:
        return
    print(f"image AUROC minus {reference}'s, 95% paired bootstrap interval (2,000 resamples of the test images)")
    for name, values in scores.items():
        if name == reference:
            continue
        result = paired_bootstrap_auroc_difference(labels, values, scores[reference], n_boot=2000)
        low, high = np.percentile(result["replicates"], [2.5, 97.5])
        print(f"  {name:34s} {result['difference']:+.4f} [{low:+.4f}, {high:+.4f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.01])
    parser.add_argument("--projection-ratio", type=float, default=0.1,
                        help="ratio also selected on the full features (0: skip)")
    parser.add_argument("--max-train", type=int, help="train on a seeded random N of the training images")
    parser.add_argument("--test-every", type=int, default=1, help="score every K-th test image")
    args = parser.parse_args()
    from adlib.run import prepare_data
    from adlib.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="adlib-ratios-"))
    manifest, cache = work / "manifest.parquet", work / "cache"
    prepare_data({"name": "bench", "layout": "mvtec", "root": args.data_root}, args.category, args.img_size,
                 manifest, cache)
    if args.max_train:
        keep_subset(manifest, "train", args.max_train)
    settings = Settings(data_root=args.data_root, output_dir=work, device="cpu", seed=0)
    base = {"img_size": args.img_size, "backbone": args.backbone}
    ratios = sorted(args.ratios, reverse=True)
    coreset_ratios = [r for r in ratios if r < 1.0]
    banks: list[tuple[str, float, torch.Tensor]] = []
    model, rows = None, None
    if 1.0 in ratios:
        model, seconds = train_bank(manifest, cache, work, "full", {**base, "coreset_sampling_ratio": 1.0}, settings)
        banks.append(("full bank", seconds, model.memory_bank.clone()))
    if coreset_ratios:
        top = coreset_ratios[0]
        model, seconds = train_bank(manifest, cache, work, "coreset", {**base, "coreset_sampling_ratio": top}, settings)
        selected = model.memory_bank.clone()
        n_all = round(selected.shape[0] / top)  # int(n * top) rows were selected
        for ratio in coreset_ratios:
            size = max(1, int(n_all * ratio)) if ratio != top else selected.shape[0]
            banks.append((f"coreset {ratio:g}", seconds if ratio == top else 0.0, selected[:size]))
    if args.projection_ratio:
        unprojected, seconds = train_bank(manifest, cache, work, "unprojected",
                                          {**base, "coreset_sampling_ratio": args.projection_ratio,
                                           "projection_dim": None}, settings)
        banks.append((f"coreset {args.projection_ratio:g}, full-dim selection", seconds, unprojected.memory_bank.clone()))
    rows, grid, masks, labels = embed_test(model, manifest, cache, args.img_size, args.test_every)
    print(f"{len(labels)} test images ({int(labels.sum())} anomalous)")

    header = (f"{'bank':34s} {'items':>8s} {'img AUROC':>9s} {'img s*':>7s} {'px AUROC':>8s} {'AUPRO':>6s} "
              f"{'weight med [min, max]':>22s} {'s* normal':>9s} {'s* anom':>8s} {'ties':>4s} {'fit s':>6s} {'score s':>7s}")
    print(header)
    print("-" * len(header))
    scores = {}
    for name, fit_s, bank in banks:
        r = score_bank(model, bank, rows, grid, masks, labels)
        scores[name] = r["scores"]
        print(f"{name:34s} {r['bank']:8d} {r['image_auroc']:9.4f} {r['image_auroc_s_star']:7.4f} "
              f"{r['pixel_auroc']:8.4f} {r['pixel_aupro']:6.3f} {r['weight_median']:8.4f} "
              f"[{r['weight_min']:.3f}, {r['weight_max']:.3f}] {r['s_star_normal']:9.3f} {r['s_star_anomalous']:8.3f} "
              f"{r['tied_images']:4d} {fit_s:6.0f} {r['score_s']:7.0f}", flush=True)
    from adlib.models.registry import get_spec

    default_ratio = get_spec("patchcore").model_defaults["coreset_sampling_ratio"]
    print_differences(scores, labels, reference=f"coreset {default_ratio:g}")
    if args.projection_ratio and coreset_ratios:
        projected = next((b for n, _, b in banks if n == f"coreset {args.projection_ratio:g}"), None)
        if projected is not None:
            a = {row.tobytes() for row in projected.numpy()}
            b = {row.tobytes() for row in banks[-1][2].numpy()}
            print(f"projected vs full-dim selection at {args.projection_ratio:g}: {len(a & b):,} of {len(a):,} "
                  "items in common")


if __name__ == "__main__":
    main()
