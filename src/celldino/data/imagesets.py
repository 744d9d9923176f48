"""Image sets: the sites of a screen with an explicit channel order, read one at a time.

`ImageSet.from_config(cfg)` takes a load-data table or a folder + pattern. `read(i)` returns the
site's stack (C, H, W) in `channels` order and source dtype; a channel of another shape than the
first raises `ImageSetError` naming the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.io.images import ImageReadError, read_image
from celldino.io.tables import LoadDataError, load_data_from_folder, read_load_data

KEY_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


class ImageSetError(ValueError):
    """A site whose channels cannot be stacked (different shapes or dtypes)."""


def site_key(row: pd.Series) -> str:
    """Stable key of a site: plate/well/site if present, else the first channel's file name."""
    parts = [str(row[c]) for c in KEY_COLUMNS if c in row.index and pd.notna(row[c])]
    return "/".join(parts) if parts else str(row.get("_first_file", row.name))


@dataclass
class ImageSet:
    table: pd.DataFrame  # one row per site: Metadata_*, FileName_<CH>, PathName_<CH>
    channels: list[str]  # explicit channel order

    def __post_init__(self) -> None:
        self.table = self.table.reset_index(drop=True)
        if "Metadata_Plate" not in self.table:
            self.table["Metadata_Plate"] = "plate"
        first = self.channels[0]
        self.table["_first_file"] = self.table[f"FileName_{first}"].astype(str)
        keys = [site_key(r) for _, r in self.table.iterrows()]
        if len(set(keys)) != len(keys):
            keys = [f"{k}#{i}" for i, k in enumerate(keys)]
        self.table["Metadata_ImageKey"] = keys
        self.table = self.table.drop(columns="_first_file")

    @classmethod
    def from_config(cls, cfg) -> ImageSet:
        """From `cfg.load_data`, or from `cfg.image_dir` + `cfg.pattern` (+ channel_map)."""
        chans = list(cfg.channels) or None
        if cfg.load_data:
            df, chans = read_load_data(cfg.load_data, chans)
        elif cfg.image_dir:
            if not cfg.pattern:
                raise LoadDataError(
                    "prepare.image_dir needs prepare.pattern (e.g. opera_phenix, nf1)"
                )
            df, chans = load_data_from_folder(
                cfg.image_dir, cfg.pattern, dict(cfg.channel_map), chans, plate=cfg.plate
            )
        else:
            raise LoadDataError(
                "set prepare.load_data (a table) or prepare.image_dir + prepare.pattern"
            )
        return cls(df, chans)

    def __len__(self) -> int:
        return len(self.table)

    def paths(self, i: int) -> list[Path]:
        row = self.table.iloc[i]
        return [Path(str(row[f"PathName_{c}"])) / str(row[f"FileName_{c}"]) for c in self.channels]

    def key(self, i: int) -> str:
        return str(self.table.at[i, "Metadata_ImageKey"])

    def metadata(self, i: int) -> dict:
        row = self.table.iloc[i]
        return {c: row[c] for c in self.table.columns if c.startswith("Metadata_")}

    def plates(self) -> list[str]:
        return list(dict.fromkeys(self.table["Metadata_Plate"].astype(str)))

    def read(self, i: int) -> np.ndarray:
        """The site's stack (C, H, W) in source dtype; errors name the row and file."""
        row = self.table.iloc[i]
        planes = []
        for c, path in zip(self.channels, self.paths(i)):
            frame = row.get(f"Frame_{c}")
            frame = None if frame is None or pd.isna(frame) else int(frame)
            try:
                planes.append(read_image(path, frame=frame))
            except ImageReadError as e:
                raise ImageReadError(e.path, f"{e.reason} [load-data row {i}, channel {c}]") from e
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            detail = ", ".join(f"{c}: {p.shape}" for c, p in zip(self.channels, planes))
            raise ImageSetError(
                f"load-data row {i} ({self.key(i)}): channels have different shapes ({detail}); "
                "all channels of a site must be the same size"
            )
        dtypes = {p.dtype for p in planes}
        dtype = np.result_type(*dtypes) if len(dtypes) > 1 else planes[0].dtype
        return np.stack([p.astype(dtype, copy=False) for p in planes])  # (C, H, W)
