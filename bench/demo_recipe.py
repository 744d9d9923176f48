"""Training recipes on the demo screen, scored with the cell-level probes (issue 20).

The demo's well-level metrics move as much between two checkpoints of one run as between
recipes; single cells give thousands of test samples. This trains one recipe on the prepared demo
cells (no labels) and scores its teacher against the same architecture at random initialisation
with the `cell_probe` analysis of `celldino evaluate` (leave-one-plate-out logistic regression and
DINO's temperature-weighted 20-NN, MoA macro-F1 on the treated cells, 95 % intervals that redraw
wells, paired differences).

    .venv/bin/python bench/demo_recipe.py ablate NAME [--prep DIR] [--size PX] key=value ...
    .venv/bin/python bench/demo_recipe.py table

`--prep`: a prep folder of the demo screen (`celldino demo` writes demo_out/prep); `--size`:
the side the crops are resized to for embedding (default: the recipe's global crop size, the
grid training saw). Results: one JSON line per run in bench/results/demo_recipe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from celldino import config as C  # noqa: E402
from real_cells import embed  # noqa: E402  (cells resized as `celldino extract` does)

RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "src" / "celldino" / "configs" / "demo.yaml"


def cmd_ablate(args) -> None:
    from celldino import log
    from celldino.data import CropDataset
    from celldino.eval.cell_probe import cell_probe
    from celldino.models.build import build_model, load_backbone
    from celldino.train import train

    log.setup(0)
    torch.set_num_threads(args.threads)
    run_dir = ROOT / "runs" / "demo_recipe" / args.name
    cfg = C.load_config(
        DEMO,
        [
            f"train.run_dir={run_dir}",
            f"train.data={args.prep}",
            "train.device=cpu",
            *args.overrides,
        ],
    )
    minutes = float("nan")
    if not (run_dir / "checkpoints" / "last.safetensors").exists():
        t0 = time.perf_counter()
        train(cfg)
        minutes = (time.perf_counter() - t0) / 60
    ds = CropDataset(args.prep)
    meta = ds.metadata.reset_index(drop=True)
    x = torch.stack([ds[i] for i in range(len(ds))]).numpy()
    size = args.size or cfg.augment.global_crop_size
    trained, mcfg = load_backbone(run_dir, which="teacher")
    torch.manual_seed(cfg.train.seed)  # the initialisation training started from
    rand = build_model(C.replace(mcfg, drop_path_rate=0.0, pretrained="")).eval()
    sets = {
        "learned": embed(trained, x, args.feature, size=size),
        "random_init": embed(rand, x, args.feature, size=size),
    }
    treated = (meta["Metadata_pert_type"] != "control").to_numpy()  # as evaluate's cell_probe
    summary, _, paired = cell_probe(
        meta[treated],
        {k: v[treated] for k, v in sets.items()},
        label="Metadata_MoA",
        split_by="Metadata_Plate",
        well="Metadata_Well",
        n_boot=args.n_boot,
    )
    last = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if "loss" in r][-1]
    rec = {
        "name": args.name,
        "overrides": args.overrides,
        "size": size,
        "feature": args.feature,
        "minutes": round(minutes, 2),
        "steps": last.get("step"),
        **{k: last[k] for k in ("prototypes_used", "mean_teacher_entropy") if k in last},
    }
    for r in summary.itertuples():
        rec[f"{r.feature_set} {r.metric}"] = [round(v, 4) for v in (r.value, r.ci_low, r.ci_high)]
    for r in paired.itertuples():
        rec[f"delta {r.metric}"] = [round(v, 4) for v in (r.difference, r.ci_low, r.ci_high)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "demo_recipe.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def cmd_table(args) -> None:
    rows = [json.loads(s) for s in (RESULTS / "demo_recipe.jsonl").read_text().splitlines()]

    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "-"

    print("| run | changes | px | min | linear | random | Δ linear | 20-NN | random | Δ 20-NN |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            r["name"],
            " ".join(r["overrides"]) or "-",
            str(r["size"]),
            f"{r['minutes']:.1f}",
        ]
        for m in ("linear_f1", "knn20_f1"):
            cells += [
                ci(r.get(f"learned {m}")),
                f"{r.get(f'random_init {m}', [np.nan])[0]:.3f}",
                ci(r.get(f"delta {m}")),
            ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ablate")
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--prep", default=str(ROOT / "demo_out" / "prep"))
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--feature", default="cls")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=1000)
    sub.add_parser("table")
    args = ap.parse_args()
    {"ablate": cmd_ablate, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
