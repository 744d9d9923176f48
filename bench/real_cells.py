"""Learned vs engineered on real cells: one harness, the same cells and splits for every feature set.

Real MCF-7 single-cell crops of BBBC021 (../shared/data/bbbc021_crops, 68x68x3 uint16, 6 plates).
Scored on the three plates that hold both DMSO and cycloheximide (Week4_27801/27821/27861,
5,499 cells), leave-one-plate-out:

- tasks: `dose` (0 / 5 / 15 / 50 uM, 4 classes; 5 uM exists on two plates only) and `compound`
  (DMSO vs cycloheximide);
- levels: `cell` (single cells) and `fov` (the mean of a field of view's cells; 38 fields, so a
  held-out plate has 12-13 of them and the numbers are flagged "few test samples");
- classifiers: cosine kNN with k = 1, 5, 20 and a linear probe (logistic regression), on features
  z-scored with the training plates' mean and spread (one rule for every set);
- each value is the macro-F1 averaged over the three held-out plates, with its chance level (the
  better of majority / stratified guessing, `celldino.eval.stats.f1_chance`) and a 95 % interval
  from a bootstrap that redraws whole fields of view within each well (cells of one field are not
  independent; a well is one dose, so every redraw keeps the classes); differences between two
  sets use the same redraws (paired). The 5 uM wells have one field each: their share of the
  variance is not in the interval.

Feature sets: a trained celldino checkpoint (DINO or WS-DINO), the same architecture at random
initialisation, CellProfiler's measurements (cp_measure, `bench/real_cells_engineered.py`), the 30
intensity statistics of the data README, PCA of the CellProfiler features (fitted on the training
plates) and the concatenation of learned + CellProfiler (each block scaled to equal total variance).

    .venv/bin/python bench/real_cells.py score --checkpoint runs/real_cells/dino   # tables
    .venv/bin/python bench/real_cells.py ablate NAME key=value ...   # train (all 6 plates, no
        labels) + score; one line appended to bench/results/real_cells.jsonl
    .venv/bin/python bench/real_cells.py table                      # the ablation table
    .venv/bin/python bench/real_cells.py curve RUN_DIR              # learning curve per checkpoint
    .venv/bin/python bench/real_cells.py transport                  # transport/bbbc021.npz (GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from celldino import config as C  # noqa: E402
from celldino.eval.stats import bootstrap_counts, f1_chance, macro_f1_batch  # noqa: E402
from celldino.extract.feature_modes import needs_blocks, select_features  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "bbbc021_crops"
TRANSPORT = ROOT / "transport" / "bbbc021.npz"
RESULTS = ROOT / "bench" / "results"
REFERENCE = ROOT / "bench" / "real_cells_reference.json"  # engineered scores, for GPU runs
PLATES = ("Week4_27801", "Week4_27821", "Week4_27861")
META = ("plate", "well", "source_image_stem", "concentration_uM", "compound")
TASKS = {"dose": "concentration_uM", "compound": "compound"}
KS = (1, 5, 20)
CENTRE = 64  # centre 64 px of the 68 px crops (patch sizes 4, 8, 16 divide it)


# ---- cells -------------------------------------------------------------------------------------


NORMS = ("global", "plate", "crop")


def _scale(imgs: np.ndarray, groups: np.ndarray | None = None, norm: str = "global") -> np.ndarray:
    """(N, H, W, C) raw -> (N, C, H, W) float32 in [0, 1] by a 0.1-99.9 % percentile window per
    channel. `global`: one window over all cells, so a brighter cell stays brighter (dose
    phenotypes are partly intensity); `plate`: one window per plate (`groups`), which also takes
    out plate-to-plate intensity shifts and uses no labels; `crop`: one window per crop, which
    erases intensity (kept as the ablation that shows it)."""
    x = imgs.astype(np.float32).transpose(0, 3, 1, 2)
    if norm == "crop":
        axes, parts = (2, 3), [np.arange(len(x))]
    elif norm == "plate":
        axes, parts = (0, 2, 3), [np.flatnonzero(groups == g) for g in pd.unique(groups)]
    else:
        axes, parts = (0, 2, 3), [np.arange(len(x))]
    out = np.empty_like(x)
    for rows in parts:
        v = x[rows]
        lo = np.percentile(v, 0.1, axis=axes, keepdims=True)
        hi = np.percentile(v, 99.9, axis=axes, keepdims=True)
        out[rows] = np.clip((v - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return out


def load_cells(source: Path | None = None, norm: str = "global") -> tuple[np.ndarray, pd.DataFrame]:
    """All 7,774 cells (6 plates) as (N, 3, 64, 64) float32 in [0, 1] and their metadata, from the
    shared data folder (scaled by `norm`, see `_scale`) or from a transport file made by
    `build_transport` (global scaling)."""
    source = Path(source) if source else (DATA if DATA.exists() else TRANSPORT)
    if source.suffix == ".npz":
        if norm != "global":
            raise SystemExit(f"{source} holds globally scaled cells: --norm {norm} needs {DATA}")
        z = np.load(source, allow_pickle=False)
        x = z["images"].astype(np.float32) / 255.0  # (N, C, 64, 64) uint8
        meta = pd.DataFrame({k: z[k] for k in META})
    else:
        meta = pd.read_csv(source / "metadata.csv")[list(META)]
        imgs = np.load(source / "crops_all.npz")["images"]  # (N, 68, 68, 3) uint16
        o = (imgs.shape[1] - CENTRE) // 2
        x = _scale(imgs[:, o : o + CENTRE, o : o + CENTRE, :], meta["plate"].to_numpy(), norm)
    meta["plate_well"] = meta["plate"].astype(str) + "/" + meta["well"].astype(str)
    return np.ascontiguousarray(x), meta


def raw_crops(source: Path | None = None) -> np.ndarray:
    """The raw (N, 68, 68, 3) uint16 crops (engineered features are measured on these)."""
    return np.load(Path(source or DATA) / "crops_all.npz")["images"]


def build_transport(data: Path, out: Path) -> Path:
    """The three scored plates' cells as uint8 (after the per-channel percentile scaling of all
    six plates), compressed, 41 MB: what a GPU machine that receives at most 64 MiB of the
    working tree (and not ../shared) needs. CellProfiler's features would add 17 MB (float16),
    too close to the limit: a GPU run compares with the intensity statistics it measures there
    and with the CellProfiler scores of the same cells and splits kept in REFERENCE."""
    x, meta = load_cells(data)
    keep = meta["plate"].isin(PLATES).to_numpy()  # all 6 plates: 58 MB, too close to 64 MiB
    x, meta = x[keep], meta[keep]
    arrays = {k: meta[k].to_numpy().astype(str if meta[k].dtype == object else None) for k in META}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=np.round(x * 255).astype(np.uint8), **arrays)
    return out


class Crops(torch.utils.data.Dataset):
    """Map-style dataset of (C, H, W) tensors with a `.metadata` table (WS-DINO reads it)."""

    def __init__(self, x: np.ndarray, metadata: pd.DataFrame) -> None:
        self.x, self.metadata = torch.from_numpy(x), metadata.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


# ---- embeddings --------------------------------------------------------------------------------


def embed(
    model: torch.nn.Module, x: np.ndarray, feature: str = "cls", n_blocks: int = 4, size: int = 0
):
    """(N, F) float32 features of a backbone (`extract.feature` modes: cls, last_blocks, ...), on
    the GPU when there is one; `size` > 0: the cells resized to it first, as `celldino extract`
    resizes them to the trained global crop size (`augment.geometric.whole_cell_view`)."""
    from celldino.augment.geometric import whole_cell_view

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).eval()
    out = []
    blocks = needs_blocks(feature)
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            b = whole_cell_view(torch.from_numpy(x[i : i + 256]).to(dev), size)
            o = model(b, return_blocks=blocks)
            out.append(select_features(o, feature, n_blocks=n_blocks).float().cpu().numpy())
    return np.concatenate(out)


def random_init(model_cfg: C.ModelConfig, seed: int = 0) -> torch.nn.Module:
    from celldino.models.build import build_model

    torch.manual_seed(seed)
    return build_model(C.replace(model_cfg, drop_path_rate=0.0, pretrained="")).eval()


def engineered_sets(
    source: Path | None, x: np.ndarray, meta: pd.DataFrame
) -> dict[str, np.ndarray]:
    """CellProfiler's measurements (cached) and the 30 intensity statistics of the same cells.

    From the data folder, CellProfiler comes from the raw crops (cache in bench/results); a
    transport file (a GPU machine) has no raw crops: only the statistics, measured there on the
    same globally scaled centre crops as in the data README."""
    import real_cells_engineered as eng

    source = Path(source) if source else (DATA if DATA.exists() else TRANSPORT)
    sets: dict[str, np.ndarray] = {}
    if source.suffix == ".npz":
        sets["intensity stats (30)"] = eng.intensity_stats(x.transpose(0, 2, 3, 1))[0]
        return sets
    imgs = raw_crops(source)
    o = (imgs.shape[1] - CENTRE) // 2
    centre = _scale(imgs[:, o : o + CENTRE, o : o + CENTRE, :]).transpose(0, 2, 3, 1)
    sets["intensity stats (30)"] = eng.intensity_stats(centre)[0]
    sets["CellProfiler"] = eng.cellprofiler_features(imgs, cache=RESULTS, families="all")[0]
    return sets


# ---- scoring -----------------------------------------------------------------------------------


def _zscore(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(a - mu) / sd for a in (train, *others)]


def _fov_means(f: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean features per field of view and one metadata row per field (first-seen order)."""
    codes, _ = pd.factorize(meta["source_image_stem"])
    sums = np.zeros((codes.max() + 1, f.shape[1]))
    np.add.at(sums, codes, f)
    fmeta = meta.drop_duplicates("source_image_stem").reset_index(drop=True)
    return sums / np.bincount(codes)[:, None], fmeta


def _pca_fold(train: np.ndarray, test: np.ndarray, n: int = 50) -> list[np.ndarray]:
    from sklearn.decomposition import PCA

    p = PCA(n_components=min(n, train.shape[1], len(train) - 1), random_state=0).fit(train)
    return [p.transform(train), p.transform(test)]


def predict(
    f: np.ndarray | dict[str, np.ndarray],
    meta: pd.DataFrame,
    task: str,
    *,
    pca: int = 0,
    weights: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Leave-one-plate-out predictions of every classifier: ({name: (n,) codes}, (n,) truth codes)
    for the rows of `meta`. `f` is one (n, F) array, or one per held-out plate (a model trained
    without that plate's cells embeds every cell of its fold); `weights` (F,) scale the z-scored
    columns (`block_weights`)."""
    y_all, classes = pd.factorize(meta[TASKS[task]].astype(str), sort=True)
    preds = {f"kNN k={k}": np.full(len(meta), -1) for k in KS} | {"linear": np.full(len(meta), -1)}
    for plate in PLATES:
        test = (meta["plate"] == plate).to_numpy()
        train = ~test
        fp = f[plate] if isinstance(f, dict) else f
        a, b = _zscore(fp[train], fp[test])
        if weights is not None:  # after the z-score, which would undo any scaling before it
            a, b = a * weights, b * weights
        if pca:
            a, b = _zscore(*_pca_fold(a, b, pca))
        for k in KS:
            kk = min(k, int(train.sum()))
            knn = KNeighborsClassifier(kk, metric="cosine", algorithm="brute").fit(a, y_all[train])
            preds[f"kNN k={k}"][test] = knn.predict(b)
        lin = LogisticRegression(C=1.0, max_iter=2000).fit(a, y_all[train])
        preds["linear"][test] = lin.predict(b)
    return preds, y_all


class Scorer:
    """Scores feature sets on the three plates with shared bootstrap redraws (paired deltas)."""

    def __init__(self, meta: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> None:
        keep = meta["plate"].isin(PLATES).to_numpy()
        self.keep = keep
        self.meta = meta[keep].reset_index(drop=True)
        self.fov_meta = _fov_means(np.zeros((len(self.meta), 1)), self.meta)[1]
        self.n_boot = n_boot
        rng = np.random.default_rng(seed)
        self.weights = {lvl: self._weights(m, rng) for lvl, m in self.levels().items()}
        self.preds: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def levels(self) -> dict[str, pd.DataFrame]:
        return {"cell": self.meta, "fov": self.fov_meta}

    def _weights(self, m: pd.DataFrame, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per plate, (B, n_plate) multiplicities: fields of view redrawn within their well (a
        well is one dose), so each redraw keeps the plate's classes; a field's cells come along."""
        out = {}
        for plate in PLATES:
            sub = m[(m["plate"] == plate).to_numpy()]
            w = np.zeros((self.n_boot, len(sub)), dtype=np.int64)
            for well in pd.unique(sub["well"]):
                rows = np.flatnonzero((sub["well"] == well).to_numpy())
                codes, uniq = pd.factorize(sub["source_image_stem"].to_numpy()[rows])
                w[:, rows] = bootstrap_counts(len(uniq), self.n_boot, rng)[:, codes]
            out[plate] = w
        return out

    def _rows(self, f: np.ndarray, level: str) -> np.ndarray:
        f = f[self.keep] if len(f) == len(self.keep) else f
        return f if level == "cell" else _fov_means(f, self.meta)[0]

    def score(
        self, name: str, f, *, pca: int = 0, weights=None, tasks=TASKS, levels=None
    ) -> pd.DataFrame:
        """Rows of every task x level x classifier; `f` (N, F) or {held-out plate: (N, F)}."""
        rows = []
        for level in levels or ("cell", "fov"):
            m = self.meta if level == "cell" else self.fov_meta
            if isinstance(f, dict):
                g = {pl: self._rows(v, level) for pl, v in f.items()}
            else:
                g = self._rows(f, level)
            for task in tasks:
                preds, y = predict(g, m, task, pca=pca, weights=weights)
                n_train = min(int((m["plate"] != pl).sum()) for pl in PLATES)
                for clf, p in preds.items():
                    self.preds[(name, task, level, clf)] = (p, y)
                    too_few = clf.startswith("kNN") and int(clf.split("=")[1]) >= n_train / 2
                    row = {"set": name, "task": task, "level": level, "classifier": clf}
                    row |= self._stats(m, level, y, p)
                    if too_few:  # k near the training size: a vote of most of the training set
                        row["flags"] = "; ".join(
                            filter(None, [row["flags"], "k >= half the training rows"])
                        )
                    rows.append(row)
        return pd.DataFrame(rows)

    def _per_plate(self, m, level, y, p, boot: bool):
        n_cls = int(y.max()) + 1
        vals = []
        for plate in PLATES:
            sel = (m["plate"] == plate).to_numpy()
            w = self.weights[level][plate] if boot else None
            vals.append(macro_f1_batch(y[sel], p[sel], n_cls, w))
        return np.mean(vals, axis=0), [float(v[0]) for v in vals] if not boot else None

    def _stats(self, m, level, y, p) -> dict:
        obs, per = self._per_plate(m, level, y, p, boot=False)
        boot, _ = self._per_plate(m, level, y, p, boot=True)
        n_cls = int(y.max()) + 1
        chance = np.mean(
            [
                f1_chance(
                    y[(m["plate"] != pl).to_numpy()], y[(m["plate"] == pl).to_numpy()], n_cls
                )["chance"]
                for pl in PLATES
            ]
        )
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        n_test = min(int((m["plate"] == pl).sum()) for pl in PLATES)
        return {
            "f1": float(obs[0]),
            "ci_low": float(lo),
            "ci_high": float(hi),
            "chance": float(chance),
            **{pl[-5:]: v for pl, v in zip(PLATES, per)},
            "flags": "few test samples" if n_test < 30 else "",
        }

    def delta(self, a: str, b: str, task="dose", level="cell", clf="kNN k=5") -> dict:
        """a - b with a paired 95 % interval (same field-of-view redraws)."""
        m = self.meta if level == "cell" else self.fov_meta
        (pa, y), (pb, _) = self.preds[(a, task, level, clf)], self.preds[(b, task, level, clf)]
        oa, _ = self._per_plate(m, level, y, pa, False)
        ob, _ = self._per_plate(m, level, y, pb, False)
        ba, _ = self._per_plate(m, level, y, pa, True)
        bb, _ = self._per_plate(m, level, y, pb, True)
        lo, hi = np.nanpercentile(ba - bb, [2.5, 97.5])
        return {"delta": float(oa[0] - ob[0]), "ci_low": float(lo), "ci_high": float(hi)}


def block_weights(*widths: int) -> np.ndarray:
    """Column weights giving each block of z-scored features the same total variance (1 / sqrt
    of its width), so 1,590 CellProfiler columns do not drown 768 learned ones."""
    return np.concatenate([np.full(w, 1 / np.sqrt(w)) for w in widths])


def print_table(df: pd.DataFrame, task: str, level: str) -> None:
    sub = df[(df.task == task) & (df.level == level)]
    clfs = list(dict.fromkeys(sub.classifier))
    print(
        f"\n{task}, {level} level: macro-F1 mean over held-out plates [95 % CI]; "
        f"chance {sub.chance.iloc[0]:.3f}"
        + (f"; {sub['flags'].iloc[0]}" if sub["flags"].iloc[0] else "")
    )
    print("| set | " + " | ".join(clfs) + " |")
    print("|---|" + "---:|" * len(clfs))
    for name, g in sub.groupby("set", sort=False):
        cells = [f"{r.f1:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in g.itertuples()]
        print(f"| {name} | " + " | ".join(cells) + " |")


# ---- training ----------------------------------------------------------------------------------

BASE = ROOT / "configs" / "real-cells.yaml"


def train_run(x, meta, run_dir: Path, overrides: list[str], rows=None) -> tuple[Path, float]:
    from celldino.train import train

    cfg = C.load_config(BASE, [f"train.run_dir={run_dir}", "train.data=", *overrides])
    rows = np.arange(len(x)) if rows is None else rows
    t0 = time.perf_counter()
    train(cfg, dataset=Crops(x[rows], meta.iloc[rows]))
    return run_dir, (time.perf_counter() - t0) / 60


def trained_size(path: Path, given: int = -1) -> int:
    """The side cells are embedded at: `given` >= 0 as it is (0 = as stored), else the global
    crop size the checkpoint records (extract.resize=-1), else its run's config.yaml's."""
    from celldino.io.checkpoints import checkpoint_crop_size
    from celldino.models.build import resolve_checkpoint

    if given >= 0:
        return given
    file = resolve_checkpoint(path)
    if size := checkpoint_crop_size(file):
        return size
    for cfg in (file.parent.parent / "config.yaml", Path(path) / "config.yaml"):
        if cfg.exists():
            return C.load_config(cfg).augment.global_crop_size
    return 0


def learned_sets(
    run_dir: Path, x, feature: str, which: str = "teacher", size: int = -1
) -> tuple[np.ndarray, C.ModelConfig, int]:
    """(features, model config, the side the cells were embedded at; see `trained_size`)."""
    from celldino.models.build import load_backbone

    model, mcfg = load_backbone(run_dir, which=which)
    size = trained_size(run_dir, size)
    return embed(model, x, feature, size=size), mcfg, size


# ---- commands ----------------------------------------------------------------------------------


def _headline(sc: Scorer, df: pd.DataFrame, name: str, refs: list[str]) -> dict:
    out = {}
    for task in TASKS:
        for clf in ("kNN k=5", "linear"):
            r = df[
                (df.set == name) & (df.task == task) & (df.level == "cell") & (df.classifier == clf)
            ]
            out[f"{task} {clf}"] = round(float(r.f1.iloc[0]), 4)
            out[f"{task} {clf} ci"] = [
                round(float(r.ci_low.iloc[0]), 4),
                round(float(r.ci_high.iloc[0]), 4),
            ]
            for ref in refs:
                d = sc.delta(name, ref, task, "cell", clf)
                out[f"{task} {clf} - {ref}"] = [round(v, 4) for v in d.values()]
    return out


def _train_or_reuse(x, meta, run_dir: Path, overrides: list[str], rows=None) -> float:
    if (run_dir / "checkpoints" / "last.safetensors").exists():
        return float("nan")  # --resume: score the run as it is
    return train_run(x, meta, run_dir, overrides, rows)[1]


def cmd_ablate(args) -> None:
    """Train one recipe (on all cells, or once per held-out plate with --per-fold) and score it
    against the same architecture at random initialisation; one JSON line per run."""
    x, meta = load_cells(args.cells, args.norm)
    torch.set_num_threads(args.threads)
    from celldino import log

    log.setup(0)
    run_dir = ROOT / "runs" / "real_cells" / args.name
    if run_dir.exists() and not args.resume:
        raise SystemExit(f"{run_dir} exists: pass another NAME or --resume to score it as it is")
    if args.per_fold:  # the held-out plate's cells never reach training (WS-DINO needs this)
        minutes, f = 0.0, {}
        for plate in PLATES:
            rows = np.flatnonzero((meta["plate"] != plate).to_numpy())
            minutes += _train_or_reuse(x, meta, run_dir / plate, args.overrides, rows)
            f[plate], mcfg, size = learned_sets(run_dir / plate, x, args.feature, size=args.size)
        state = run_dir / PLATES[0] / "metrics.jsonl"
    else:
        minutes = _train_or_reuse(x, meta, run_dir, args.overrides)
        f, mcfg, size = learned_sets(run_dir, x, args.feature, size=args.size)
        state = run_dir / "metrics.jsonl"
    last = json.loads(state.read_text().splitlines()[-1]) if state.exists() else {}
    planned = C.load_config(state.parent / "config.yaml").train.epochs
    if last.get("epoch", 0) < planned:  # an interrupted run would score as if it had finished
        raise SystemExit(
            f"{state.parent} stopped at epoch {last.get('epoch', 0):g} of {planned}: "
            "resume its training (`celldino train CONFIG --resume`) or delete it"
        )
    sc = Scorer(meta, n_boot=args.n_boot)
    kw = dict(tasks=("dose",), levels=("cell",))
    df = pd.concat(
        [
            sc.score("learned", f, **kw),
            sc.score("random init", embed(random_init(mcfg), x, args.feature, size=size), **kw),
        ]
    )
    rec = {
        "name": args.name,
        "overrides": args.overrides,
        "feature": args.feature,
        "norm": args.norm,
        "size": size,
        "per_fold": args.per_fold,
        "minutes": round(minutes, 2),
        "steps": last.get("step"),
        "teacher_entropy": round(last.get("teacher_entropy", float("nan")), 3),
    }
    for clf in ("kNN k=5", "linear"):
        r = df[(df.set == "learned") & (df.classifier == clf)].iloc[0]
        q = df[(df.set == "random init") & (df.classifier == clf)].iloc[0]
        d = sc.delta("learned", "random init", "dose", "cell", clf)
        rec[clf] = [round(r.f1, 4), round(r.ci_low, 4), round(r.ci_high, 4)]
        rec[f"{clf} random"] = round(q.f1, 4)
        for who, row in (("", r), (" random", q)):  # every held-out plate, not only the mean
            rec[f"{clf}{who} folds"] = {p[-5:]: round(row[p[-5:]], 4) for p in PLATES}
        rec[f"{clf} delta"] = [round(v, 4) for v in d.values()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_cells.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def cmd_curve(args) -> None:
    """Dose macro-F1 (cells, kNN k=5 and linear) of every epoch checkpoint of a run against the
    samples seen, with random init at 0 and the engineered sets as horizontal lines."""
    from celldino.models.build import load_backbone

    x, meta = load_cells(args.cells, args.norm)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    files = sorted((run / "checkpoints").glob("epoch_*.safetensors"))
    n_train = len(x)  # `ablate` without --per-fold trains on every cell
    sc = Scorer(meta, n_boot=args.n_boot)
    kw = dict(tasks=("dose",), levels=("cell",))
    mcfg = load_backbone(run)[1]  # the architecture of the random-init point
    size = trained_size(run, args.size)
    r = embed(random_init(mcfg), x, args.feature, size=size)
    points = [("random init", 0, sc.score("r", r, **kw))]
    for fl in files:
        ep = int(fl.stem.split("_")[1])
        m, _ = load_backbone(fl)
        f = embed(m, x, args.feature, size=size)
        points.append((fl.stem, ep * n_train, sc.score(fl.stem, f, **kw)))
    refs = {n: sc.score(n, f, **kw) for n, f in engineered_sets(args.cells, x, meta).items()}
    rows = []
    for name, seen, df in points:
        for r in df.itertuples():
            rows.append(
                {
                    "point": name,
                    "samples_seen": seen,
                    "classifier": r.classifier,
                    "f1": r.f1,
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                }
            )
    curve = pd.DataFrame(rows)
    print(curve[curve.classifier.isin(["kNN k=5", "linear"])].to_string(index=False))
    for n, df in refs.items():
        for r in df[df.classifier.isin(["kNN k=5", "linear"])].itertuples():
            print(f"{n}: {r.classifier} {r.f1:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, clf in zip(axes, ("kNN k=5", "linear")):
            c = curve[curve.classifier == clf]
            ax.plot(c.samples_seen, c.f1, "o-", color="C0", label="DINO (celldino)")
            ax.fill_between(c.samples_seen, c.ci_low, c.ci_high, color="C0", alpha=0.2)
            for i, (n, df) in enumerate(refs.items()):
                r = df[df.classifier == clf].iloc[0]
                ax.axhline(r.f1, color=f"C{i + 1}", ls="--", label=n)
                ax.axhspan(r.ci_low, r.ci_high, color=f"C{i + 1}", alpha=0.1)
            ax.axhline(
                points[0][2][points[0][2].classifier == clf].chance.iloc[0],
                color="grey",
                ls=":",
                label="chance",
            )
            ax.set_title(f"BBBC021 dose, {clf}, held-out plates")
            ax.set_xlabel("crops seen in training")
        axes[0].set_ylabel("macro-F1")
        axes[1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


def cmd_table(args) -> None:
    recs = [json.loads(line) for line in open(RESULTS / "real_cells.jsonl")]
    last = {}  # a rescored run (--resume) replaces its earlier line, first position kept
    for r in recs:
        key = (r["name"], r["feature"], r.get("norm", "global"))
        if key in last and r["minutes"] != r["minutes"]:  # NaN: rescored, training time kept
            r["minutes"] = last[key]["minutes"]
        last[key] = r
    recs = list(last.values())
    print(
        "| run | changes | min | k=5 F1 [CI] | minus random init [CI] | linear F1 | minus random |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in recs:
        k, d, lin, dl = r["kNN k=5"], r["kNN k=5 delta"], r["linear"], r["linear delta"]
        print(
            f"| {r['name']} | {' '.join(r['overrides']) or '-'} {r['feature']} {r.get('norm', 'global')}{' per-fold' if r.get('per_fold') else ''} | {r['minutes']} | "
            f"{k[0]:.3f} [{k[1]:.3f}, {k[2]:.3f}] | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | "
            f"{lin[0]:.3f} | {dl[0]:+.3f} [{dl[1]:+.3f}, {dl[2]:+.3f}] |"
        )


def cmd_score(args) -> None:
    x, meta = load_cells(args.cells, args.norm)
    torch.set_num_threads(args.threads)
    sc = Scorer(meta, n_boot=args.n_boot)
    sets: dict[str, np.ndarray] = {}
    mcfg = None
    for ck in args.checkpoint:
        name = Path(ck).name
        sets[name], mcfg, size = learned_sets(Path(ck), x, args.feature, size=args.size)
    if mcfg is not None:  # at the size of the last checkpoint
        sets["random init"] = embed(random_init(mcfg), x, args.feature, size=size)
    if not args.no_engineered:
        sets |= engineered_sets(args.cells, x, meta)
    frames = [sc.score(n, f) for n, f in sets.items()]
    if "CellProfiler" in sets:
        frames.append(sc.score("PCA(CellProfiler, 50)", sets["CellProfiler"], pca=50))
        for ck in args.checkpoint:
            name = Path(ck).name
            both = np.concatenate([sets[name], sets["CellProfiler"]], axis=1)
            w = block_weights(sets[name].shape[1], sets["CellProfiler"].shape[1])
            frames.append(sc.score(f"{name} + CellProfiler", both, weights=w))
    df = pd.concat(frames, ignore_index=True)
    refs = [r for r in ("random init", "CellProfiler", "intensity stats (30)") if r in sets]
    heads = {n: _headline(sc, df, n, [r for r in refs if r != n]) for n in sets if n not in refs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"rows": df.to_dict("records"), "headline": heads}, indent=1)
        )
        print(f"wrote {args.out}")
    if args.write_reference and "CellProfiler" in sets:
        eng = df[df.set.isin(["CellProfiler", "PCA(CellProfiler, 50)", "intensity stats (30)"])]
        REFERENCE.write_text(json.dumps({"rows": eng.round(4).to_dict("records")}, indent=0))
        print(f"wrote {REFERENCE}")
    if "CellProfiler" not in sets and REFERENCE.exists():  # a GPU machine: no raw crops
        ref = pd.DataFrame(json.loads(REFERENCE.read_text())["rows"])
        ref["set"] = ref["set"] + " (reference, measured on CPU)"
        df = pd.concat(
            [df, ref[ref.set.str.startswith(("CellProfiler", "PCA"))]], ignore_index=True
        )
    for task in TASKS:
        for level in ("cell", "fov"):
            print_table(df, task, level)
    print("\npaired differences, cell level (value [95 % CI]):")
    for n, h in heads.items():
        for k, v in h.items():
            if " - " in k:
                print(f"  {n}: {k}: {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cells", type=Path, default=None, help="data folder or transport .npz")
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--n-boot", type=int, default=1000)
    common.add_argument("--feature", default="cls", help="extract.feature mode")
    common.add_argument("--norm", default="global", choices=NORMS, help="input scaling")
    common.add_argument(
        "--size", type=int, default=0, help="embed at this side (0: as stored, -1: trained crop)"
    )
    p = sub.add_parser("score", parents=[common])
    p.add_argument("--checkpoint", nargs="*", default=[])
    p.add_argument("--no-engineered", action="store_true")
    p.add_argument("--write-reference", action="store_true", help="keep engineered rows for GPU")
    p.add_argument("--out", default="")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("ablate", parents=[common])
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--per-fold", action="store_true", help="one model per held-out plate")
    p.set_defaults(fn=cmd_ablate)
    p = sub.add_parser("curve", parents=[common])
    p.add_argument("run")
    p.add_argument("--plot", default="")
    p.set_defaults(fn=cmd_curve)
    p = sub.add_parser("table", parents=[common])
    p.set_defaults(fn=cmd_table)
    p = sub.add_parser("transport", parents=[common])
    p.add_argument("--out", type=Path, default=TRANSPORT)
    p.set_defaults(fn=lambda a: print(build_transport(a.cells or DATA, a.out)))
    args, extra = ap.parse_known_args(argv)  # key=value after an option (argparse stops there)
    if extra and not (args.cmd == "ablate" and all("=" in e and e[0] != "-" for e in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    args.fn(args)


if __name__ == "__main__":
    main()
