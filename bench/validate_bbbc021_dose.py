"""BBBC021 dose from self-supervised embeddings: a short CPU DINO training vs random init.

Real MCF-7 single-cell crops (../shared/data/bbbc021_crops, 68x68x3 uint16). Plates
Week4_27801/27821/27861 (the ones holding both DMSO and cycloheximide). A tiny ViT is trained with
DINO (+ KoLeo) on a random subset of their crops, without labels; the teacher's class tokens of
every cell are then classified by dose (0, 5, 15, 50 uM) with a cosine 5-NN in leave-one-plate-out
folds, and the same architecture at its random initialisation is scored the same way.

    .venv/bin/python bench/validate_bbbc021_dose.py            # defaults as in docs/validation.md
    .venv/bin/python bench/validate_bbbc021_dose.py --epochs 1 --n-train 512   # quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from celldino import config as C
from celldino import log
from celldino.models.build import build_model, load_backbone
from celldino.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bbbc021_crops"
PLATES = ("Week4_27801", "Week4_27821", "Week4_27861")


class Crops(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, metadata: pd.DataFrame) -> None:
        self.x, self.metadata = x, metadata

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def load(data: Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """Crops of the three plates, (N, 3, 64, 64) float32: centre 64 px, per-channel 0.1-99.9 %."""
    meta = pd.read_csv(data / "metadata.csv")
    keep = meta["plate"].isin(PLATES).to_numpy()
    imgs = np.load(data / "crops_all.npz")["images"][keep]  # (N, 68, 68, 3) uint16
    x = imgs[:, 2:66, 2:66, :].astype(np.float32).transpose(0, 3, 1, 2)  # (N, 3, 64, 64)
    lo = np.percentile(x, 0.1, axis=(0, 2, 3), keepdims=True)
    hi = np.percentile(x, 99.9, axis=(0, 2, 3), keepdims=True)
    x = np.clip((x - lo) / (hi - lo), 0, 1)
    return torch.from_numpy(np.ascontiguousarray(x)), meta[keep].reset_index(drop=True)


def embed(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        e = torch.cat([model(x[i : i + 256])["cls"] for i in range(0, len(x), 256)]).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def leave_plate_out_f1(emb: np.ndarray, meta: pd.DataFrame) -> dict[str, float]:
    y = meta["concentration_uM"].astype(str).to_numpy()
    out = {}
    for plate in PLATES:
        test = (meta["plate"] == plate).to_numpy()
        clf = KNeighborsClassifier(5, metric="cosine").fit(emb[~test], y[~test])
        out[plate] = f1_score(y[test], clf.predict(emb[test]), average="macro")
    out["mean"] = float(np.mean([out[p] for p in PLATES]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=2048, help="crops used for training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log.setup(0)
    x, meta = load(args.data)
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(len(x), size=min(args.n_train, len(x)), replace=False))
    run_dir = args.run_dir or Path(tempfile.mkdtemp()) / "run"
    cfg = C.load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"train.run_dir={run_dir}",
            f"train.epochs={args.epochs}",
            "train.device=cpu",
            "train.data=",
            "model.in_chans=3",
            "model.img_size=64",
        ],
    )
    t0 = time.perf_counter()
    train(cfg, dataset=Crops(x[sub], meta.iloc[sub]))
    minutes = (time.perf_counter() - t0) / 60
    trained, _ = load_backbone(run_dir, which="teacher")
    torch.manual_seed(cfg.train.seed)
    random_init = build_model(C.replace(cfg.model, drop_path_rate=0.0)).eval()
    rows = {
        "random init": leave_plate_out_f1(embed(random_init, x), meta),
        "DINO teacher": leave_plate_out_f1(embed(trained, x), meta),
    }
    print(
        f"\nBBBC021 dose (0/5/15/50 uM), cosine 5-NN macro-F1, leave-one-plate-out; "
        f"{len(x)} cells, trained on {len(sub)} for {args.epochs} epochs ({minutes:.1f} min CPU)"
    )
    cols = [*PLATES, "mean"]
    print(f"| {'embedding':<13} | " + " | ".join(f"{c:>11}" for c in cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, r in rows.items():
        print(f"| {name:<13} | " + " | ".join(f"{r[c]:>11.3f}" for c in cols) + " |")
    margin = rows["DINO teacher"]["mean"] - rows["random init"]["mean"]
    print(f"\nmargin (trained - random init), mean over plates: {margin:+.3f}")


if __name__ == "__main__":
    main()
