"""Evidence: the tiny config, trained on the synthetic screen's crops on CPU, gives teacher
embeddings whose single-cell MoA linear probe on held-out plates beats the same architecture at
random initialisation (both probes of `celldino evaluate`'s cell_probe are printed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from celldino import config as C
from train_helpers import one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_config_beats_random_init_on_held_out_plate(tmp_path):
    from celldino.augment.geometric import whole_cell_view
    from celldino.data import CropDataset
    from celldino.data.prepare import prepare
    from celldino.eval.cell_probe import cell_probe
    from celldino.extract.feature_modes import select_features
    from celldino.models.build import build_model, load_backbone
    from celldino.synth import make_screen
    from celldino.train import train

    cfg = C.load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"prepare.load_data={tmp_path / 'screen' / 'load_data.csv'}",
            f"prepare.out_dir={tmp_path / 'prep'}",
            f"train.data={tmp_path / 'prep'}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.device=cpu",
        ],
    )
    make_screen(tmp_path / "screen", cfg.synth)
    prepare(cfg.prepare)
    train(cfg)

    ds = CropDataset(tmp_path / "prep")
    meta = ds.metadata.reset_index(drop=True)
    treated = (meta["Metadata_pert_type"] != "control").to_numpy()
    x = torch.stack([ds[i] for i in range(len(ds))])[treated]  # un-augmented crops
    x = whole_cell_view(x, cfg.augment.global_crop_size)  # the grid trained on, as extract does

    def embed(model: torch.nn.Module):
        with torch.no_grad():
            return torch.cat(
                [select_features(model(x[i : i + 128]), "cls") for i in range(0, len(x), 128)]
            ).numpy()

    trained, _ = load_backbone(tmp_path / "run", which="teacher")
    torch.manual_seed(cfg.train.seed)  # the same initialisation training started from
    random_init = build_model(C.replace(cfg.model, drop_path_rate=0.0)).eval()
    summary, _, paired = cell_probe(
        meta[treated],
        {"learned": embed(trained), "random_init": embed(random_init)},
        label="Metadata_MoA",
        split_by="Metadata_Plate",
        well="Metadata_Well",
        n_boot=200,
    )
    score = summary.set_index(["feature_set", "metric"])["value"]
    print(
        "\ncell MoA macro-F1, leave one plate out: "
        + ", ".join(f"{s} {m} {v:.3f}" for (s, m), v in score.items())
        + "\npaired learned - random init: "
        + ", ".join(
            f"{r.metric} {r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
            for r in paired.itertuples()
        )
    )
    assert score["learned", "linear_f1"] > score["random_init", "linear_f1"]
