"""A screen prepared in parts, each its own job, then merged into one prep (docs/cluster.md).

1. `plan(cfg)` (`celldino prepare-plan`): pass 1 of `prepare` over the whole screen in
   `prepare.out_dir` (QC, the plates' illumination functions and percentiles: these need every
   site of a plate, and QC's blur score every site of the screen), and `plan.json` in
   `prepare.parts_dir` (default `<out_dir>/prepare_parts`): the sites pass 2 prepares, in table
   order, cut into `prepare.parts` contiguous ranges of equal site counts (a plate may span
   two parts: its statistics are computed once, here, and shared).
2. `run_part(cfg)` (`celldino prepare prepare.parts=N prepare.part=i`): pass 2 of part i's sites
   into `<parts_dir>/part-000i/` with the plan's statistics, resuming after the sites it
   committed; `part.json` written last says it is complete. Parts run at the same time on any
   machines that see the folder.
3. `merge(cfg)` (`celldino prepare-merge`): checks every part (present, complete, same plan,
   fingerprint and sites, no site twice) and joins them into `prepare.out_dir`: crops copied in
   the plan's order, the per-site tables linked, then prepare's own finishing step writes
   cells.parquet, engineered.parquet and skipped.parquet. The result is the single run's, bit
   for bit (same cell ids, crops, features and row order).

`run_parts_dask(cfg, client)` runs 1-3 with each part one Dask task (a local cluster of
`prepare.workers` processes, `prepare.scheduler`'s address, or a `distributed.Client`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from celldino import log
from celldino.data import prepare as P
from celldino.errors import IncompleteInputError, MissingInputError, UserError
from celldino.io.cropstore import CELLS, CROPS, LEDGER, PARTS, missing_chunks
from celldino.io.files import read_json, require_writable, write_json
from celldino.io.lock import output_lock
from celldino.io.masks import MASKS, OUTLINES
from celldino.io.prepared import ENGINEERED, SKIPPED, STATE

logger = log.get_logger(__name__)

PARTS_DIR = "prepare_parts"  # <out_dir>/prepare_parts/ unless prepare.parts_dir is set
PLAN = "plan.json"
PART_DONE = "part.json"  # written last by a part: it is complete
FEATURES = "features_parts"  # prepare's per-site engineered features
_COPY_ROWS = 512  # crops copied per write in the merge (a multiple of the store's 64-row chunks)


class PartsError(P.PrepareError):
    """Part settings that cannot work (named), or parts that do not make one screen."""


# ---- settings and folders ----------------------------------------------------------------


def _n_parts(cfg) -> int:
    if cfg.parts < 1:
        raise PartsError(
            f"prepare.parts={cfg.parts}: give the number of parts (1 or more) to split the "
            "screen into, e.g. prepare.parts=8"
        )
    return int(cfg.parts)


def _part_index(cfg) -> int:
    n = _n_parts(cfg)
    if not 0 <= cfg.part < n:
        raise PartsError(
            f"prepare.part={cfg.part} is not a part of prepare.parts={n}: give 0 to {n - 1} "
            "(on SLURM: prepare.part=$SLURM_ARRAY_TASK_ID with --array=0-" + f"{n - 1})"
        )
    return int(cfg.part)


def _no_part(cfg, command: str, does: str) -> None:
    """A command over every part refuses a part index (it would read as 'only that part')."""
    if cfg.part != -1:
        raise PartsError(
            f"prepare.part={cfg.part} is given to `celldino {command}`, which {does} every "
            "part: leave prepare.part out here"
        )


def parts_dir(cfg) -> Path:
    """The folder of the plan and the parts' folders."""
    return Path(cfg.parts_dir) if cfg.parts_dir else Path(cfg.out_dir) / PARTS_DIR


def part_dir(cfg, i: int) -> Path:
    return parts_dir(cfg) / f"part-{i:04d}"


def _cmd(cfg, what: str) -> str:
    return f"`celldino {what}` with the same config and prepare.parts={cfg.parts}"


def _table_digest(iset) -> str:
    t = iset.table
    h = hashlib.sha256("\n".join(f"{c}\t{d}" for c, d in t.dtypes.items()).encode())
    h.update(pd.util.hash_pandas_object(t.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _settings_diff(old: dict, new: dict) -> str:
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:4])


def read_plan(cfg, iset) -> dict:
    """plan.json of these settings: refused when missing, made for another number of parts,
    other settings or another load-data table."""
    path = parts_dir(cfg) / PLAN
    if not path.exists():
        raise MissingInputError(
            f"{path} not found: run {_cmd(cfg, 'prepare-plan')} first (docs/cluster.md)"
        )
    plan = read_json(path, f"run {_cmd(cfg, 'prepare-plan')} again")
    redo = f"run {_cmd(cfg, 'prepare-plan')} again, then the parts"
    if plan.get("n_parts") != cfg.parts:
        raise PartsError(
            f"{path} splits the screen into {plan.get('n_parts')} parts, not prepare.parts="
            f"{cfg.parts}; use prepare.parts={plan.get('n_parts')}, or {redo}"
        )
    settings = P._json_like(P._settings(cfg))
    if plan.get("settings") != settings:
        raise PartsError(
            f"{path} was planned with other settings ({_settings_diff(plan.get('settings') or {}, settings)}); "
            f"use the plan's config, or {redo}"
        )
    if plan.get("table") != _table_digest(iset) or plan.get("channels") != list(iset.channels):
        raise PartsError(
            f"{path} was planned from another load-data table or channel order than "
            f"{iset.source or 'this one'}; {redo}"
        )
    return plan


# ---- 1. plan -------------------------------------------------------------------------------


def plan(cfg) -> Path:
    """Pass 1 of the whole screen in prepare.out_dir and the plan of `prepare.parts` parts;
    returns plan.json's path. Rerun with the same settings and inputs, it reuses pass 1 and
    keeps the parts already done; after a change, stale parts are removed."""
    n = _n_parts(cfg)
    _no_part(cfg, "prepare-plan", "plans")
    iset, out = P.open_inputs(cfg)
    with output_lock(out, "prepare-plan"), P.write_errors(out):
        p1 = P._pass1_cached(cfg, iset, out)
        keys = [iset.key(i) for i in p1.todo]
        if n > len(keys):
            raise PartsError(
                f"prepare.parts={n} is more than the {len(keys)} sites to prepare (after QC and "
                f"skipped images); use prepare.parts={len(keys)} or fewer"
            )
        bounds = np.linspace(0, len(keys), n + 1).round().astype(int)  # equal site counts
        folder = parts_dir(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        new = {
            "format": 1,
            "fingerprint": p1.fp,
            "n_parts": n,
            "prep": str(out),
            "settings": P._json_like(P._settings(cfg)),
            "table": _table_digest(iset),
            "channels": list(iset.channels),
            "parts": [{"index": i, "sites": keys[bounds[i] : bounds[i + 1]]} for i in range(n)],
        }
        old = read_json(folder / PLAN) if (folder / PLAN).exists() else None
        if old != new:
            _remove_stale_parts(folder, old, new)
            write_json(folder / PLAN, new)
    sizes = np.diff(bounds)
    logger.info(
        "planned %d parts of %d-%d sites (%d sites, %d plates) in %s",
        n,
        sizes.min(),
        sizes.max(),
        len(keys),
        len(iset.plates()),
        folder,
    )
    return folder / PLAN


def _remove_stale_parts(folder: Path, old: dict | None, new: dict) -> None:
    """Parts of an earlier plan that this one does not keep (another fingerprint or cut)."""
    for d in sorted(folder.glob("part-*")):
        if not d.is_dir() or not (d / LEDGER).exists() and not (d / PART_DONE).exists():
            continue
        try:
            i = int(d.name.removeprefix("part-"))
        except ValueError:
            continue
        same = (
            old is not None
            and old.get("fingerprint") == new["fingerprint"]
            and i < len(new["parts"])
            and i < len(old.get("parts", []))
            and old["parts"][i]["sites"] == new["parts"][i]["sites"]
        )
        if not same:
            logger.warning("removing %s: a part of an earlier plan", d)
            shutil.rmtree(d)


# ---- 2. one part ---------------------------------------------------------------------------


def run_part(cfg, *, after_site=None) -> Path:
    """Pass 2 of part `prepare.part` into its folder; returns the folder. Resumes after the
    sites committed; a complete part is left as it is."""
    i = _part_index(cfg)
    t0 = time.perf_counter()
    iset, out = P.open_inputs(cfg)  # the checks a whole prepare makes
    plan_ = read_plan(cfg, iset)
    state = _plan_state(out, plan_, cfg)
    keys = plan_["parts"][i]["sites"]
    folder = part_dir(cfg, i)
    require_writable(folder, "prepare.parts_dir")
    with output_lock(folder, f"prepare part {i}"), P.write_errors(folder):
        done = _read_done(folder)
        if done is not None and done.get("fingerprint") == plan_["fingerprint"]:
            if done.get("sites_digest") == _keys_digest(keys):
                logger.info("part %d of %d is complete in %s: nothing to do", i, cfg.parts, folder)
                return folder
        (folder / PART_DONE).unlink(missing_ok=True)
        locations = P._locations_table(cfg, iset) if cfg.segmentation == "locations" else None
        p1 = P._read_pass1(cfg, iset, out, state, locations=locations)
        row_of = {iset.key(r): r for r in p1.todo}
        lost = [k for k in keys if k not in row_of]
        if lost:
            raise PartsError(
                f"{parts_dir(cfg) / PLAN}: part {i} names site {lost[0]}, which {out} does not "
                f"prepare ({len(lost)} such sites); run {_cmd(cfg, 'prepare-plan')} again"
            )
        rows = [row_of[k] for k in keys]
        part_cfg = dataclasses.replace(cfg, out_dir=str(folder))  # masks/outlines go there too
        logger.info("part %d of %d: %d sites → %s", i, cfg.parts, len(rows), folder)
        store, skipped = P._pass2(part_cfg, iset, folder, p1, rows, after_site)
        write_json(
            folder / PART_DONE,
            {
                "fingerprint": plan_["fingerprint"],
                "index": i,
                "n_parts": cfg.parts,
                "sites_digest": _keys_digest(keys),
                "n_sites": len(keys),
                "n_cells": store.n_cells,
                "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
    logger.info("part %d of %d: %d cells → %s", i, cfg.parts, store.n_cells, folder)
    return folder


def _plan_state(out: Path, plan_: dict, cfg) -> dict:
    """prepare.json of the planned prep, checked to be the one the plan was made from."""
    path = out / STATE
    if not path.exists():
        raise MissingInputError(
            f"{path} not found (the plan's pass 1): run {_cmd(cfg, 'prepare-plan')} again"
        )
    state = read_json(path, f"run {_cmd(cfg, 'prepare-plan')} again")
    if state.get("fingerprint") != plan_["fingerprint"]:
        raise PartsError(
            f"{path} is not the pass 1 {parts_dir(cfg) / PLAN} was planned from (the prep "
            f"was redone since); run {_cmd(cfg, 'prepare-plan')} again, then the parts"
        )
    return state


def _read_done(folder: Path) -> dict | None:
    try:
        return read_json(folder / PART_DONE) if (folder / PART_DONE).exists() else None
    except ValueError:
        return None


# ---- 3. merge ------------------------------------------------------------------------------


def merge(cfg, *, timings: dict | None = None) -> Path:
    """Join the complete parts of the plan into prepare.out_dir (the single run's files, bit
    for bit); refused, naming the part folder, when a part is missing, incomplete, of another
    plan, settings or inputs, or holds a site twice. Returns the prep folder. `timings` (a dict)
    receives the seconds of the checks, the crop copy and the finishing step."""
    n = _n_parts(cfg)
    _no_part(cfg, "prepare-merge", "joins")
    iset, out = P.open_inputs(cfg)
    plan_ = read_plan(cfg, iset)
    with output_lock(out, "prepare-merge"), P.write_errors(out):
        # the inputs as the plan saw them (every file's size and time), else refused
        p1 = P._pass1_cached(cfg, iset, out, compute=False)
        if p1.fp != plan_["fingerprint"]:
            raise PartsError(
                f"{parts_dir(cfg) / PLAN} was made from another pass 1 than {out / STATE}; run "
                f"{_cmd(cfg, 'prepare-plan')} again, then the parts"
            )
        t0 = time.perf_counter()
        parts = _check_parts(cfg, n, plan_)
        t_check = time.perf_counter() - t0
        t_copy, t_finish = _merge_into(cfg, iset, out, p1, plan_, parts)
    if timings is not None:
        timings.update(check=t_check, copy=t_copy, finish=t_finish)
    return out


@dataclasses.dataclass
class _Part:
    index: int
    folder: Path
    ledger: dict
    skipped: list[dict]


def _check_parts(cfg, n: int, plan_: dict) -> list[_Part]:
    redo = "prepare.part={i} (it resumes after its committed sites)"
    missing, incomplete = [], []
    for i in range(n):
        d = part_dir(cfg, i)
        if not d.is_dir():
            missing.append(i)
        elif _read_done(d) is None:
            incomplete.append(i)
    if missing or incomplete:
        what = []
        if missing:
            what.append(f"part(s) {_few(missing)} missing (no folder {part_dir(cfg, missing[0])})")
        if incomplete:
            what.append(
                f"part(s) {_few(incomplete)} incomplete (no {part_dir(cfg, incomplete[0]) / PART_DONE})"
            )
        first = (missing + incomplete)[0]
        raise IncompleteInputError(
            f"cannot merge: {'; '.join(what)}; run `celldino prepare` with "
            + redo.format(i=first)
            + " for each, then merge again"
        )
    parts, owner = [], {}
    for i in range(n):
        d = part_dir(cfg, i)
        done = _read_done(d)
        keys = plan_["parts"][i]["sites"]
        if done.get("fingerprint") != plan_["fingerprint"] or done.get("n_parts") != n:
            raise PartsError(
                f"{d} was prepared with another config or other inputs than "
                f"{parts_dir(cfg) / PLAN} (fingerprint {done.get('fingerprint')} != "
                f"{plan_['fingerprint']}); delete it and run `celldino prepare` with "
                + redo.format(i=i)
            )
        if done.get("index") != i or done.get("sites_digest") != _keys_digest(keys):
            raise PartsError(
                f"{d} holds part {done.get('index')}'s sites, not part {i}'s of the plan (a "
                f"folder copied or renamed?); delete it and run `celldino prepare` with "
                + redo.format(i=i)
            )
        ledger = read_json(d / LEDGER, f"delete {d} and rerun its part")
        if ledger.get("fingerprint") != plan_["fingerprint"]:
            raise PartsError(
                f"{d / LEDGER} was written with another config or other inputs; delete {d} "
                "and run `celldino prepare` with " + redo.format(i=i)
            )
        skipped = list(done.get("skipped", []))
        have = [s["key"] for s in ledger["sites"]] + [s["Metadata_ImageKey"] for s in skipped]
        for k in have:  # a site twice: named with both folders before anything else
            if k in owner and owner[k] != d:
                raise PartsError(
                    f"site {k} is in two parts, {owner[k]} and {d}; delete the wrong folder "
                    "and rerun its part"
                )
            owner.setdefault(k, d)
        parts.append(_Part(i, d, ledger, skipped))
    for p in parts:
        i, d, ledger, skipped = p.index, p.folder, p.ledger, p.skipped
        keys = plan_["parts"][i]["sites"]
        have = [s["key"] for s in ledger["sites"]] + [s["Metadata_ImageKey"] for s in skipped]
        if sorted(have) != sorted(keys):
            extra = sorted(set(have) - set(keys))
            lack = sorted(set(keys) - set(have))
            raise PartsError(
                f"{d}: its sites are not part {i}'s of the plan ("
                + (f"{len(lack)} missing, e.g. {lack[0]}" if lack else f"extra {extra[0]}")
                + "; or one twice); delete it and run `celldino prepare` with "
                + redo.format(i=i)
            )
        import zarr

        arr = zarr.open_array(str(d / CROPS), mode="r")
        gone = missing_chunks(arr, d / CROPS, int(ledger["n"]))
        if arr.shape[0] < int(ledger["n"]) or gone:
            raise IncompleteInputError(
                f"{d / CROPS}: crops of committed sites are missing on disk; run `celldino "
                "prepare` with " + redo.format(i=i) + " (it redoes their sites)"
            )
    return parts


def _few(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (f" (and {len(idx) - 8} more)" if len(idx) > 8 else "")


def _clear_pass2(out: Path) -> None:
    """What a pass 2 (or an earlier merge) wrote in `out`: cells.parquet first."""
    for name in (CELLS, ENGINEERED, LEDGER, SKIPPED):
        (out / name).unlink(missing_ok=True)
    for name in (CROPS, PARTS, FEATURES, MASKS, OUTLINES):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _link(src: Path, dst: Path) -> None:
    """`dst` the same file as `src` (a hard link; a copy across file systems)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merge_into(cfg, iset, out: Path, p1, plan_: dict, parts: list[_Part]) -> tuple[float, float]:
    import zarr

    t0 = time.perf_counter()
    _clear_pass2(out)
    order = {k: j for j, k in enumerate(iset.key(r) for r in p1.todo)}  # single run's order
    sites = sorted(
        ((p, s) for p in parts for s in p.ledger["sites"]), key=lambda ps: order[ps[1]["key"]]
    )
    store = P.open_store(cfg, iset, out, p1)  # a new, empty store, as the single run's
    n_total = sum(int(s["count"]) for _, s in sites)
    dst = zarr.open_array(str(out / CROPS), mode="r+", config={"write_empty_chunks": True})
    dst.resize((n_total, *dst.shape[1:]))
    (out / FEATURES).mkdir(exist_ok=True)
    ledger_sites, start = [], 0
    runs: list[list] = []  # [part, source start, destination start, count], coalesced
    for j, (p, s) in enumerate(sites):
        name = f"{j:08d}.parquet"
        _link(p.folder / PARTS / s["part"], out / PARTS / name)
        if (p.folder / FEATURES / s["part"]).exists():
            _link(p.folder / FEATURES / s["part"], out / FEATURES / name)
        count = int(s["count"])
        ledger_sites.append(
            {"key": s["key"], "start": start, "count": count, "part": name, "info": s["info"]}
        )
        if count:
            last = runs[-1] if runs else None
            if last and last[0] is p and last[1] + last[3] == s["start"]:
                last[3] += count
            else:
                runs.append([p, int(s["start"]), start, count])
        start += count
    sources = {p.index: zarr.open_array(str(p.folder / CROPS), mode="r") for p in parts}
    for p, a, b, count in runs:
        src = sources[p.index]
        done = 0
        while done < count:  # writes end on the store's chunk boundaries where they can
            step = min(count - done, _COPY_ROWS - (b + done) % _COPY_ROWS)
            dst[b + done : b + done + step] = src[a + done : a + done + step]
            done += step
    for sub in (MASKS, OUTLINES):
        for p in parts:
            if (p.folder / sub).is_dir():
                (out / sub).mkdir(exist_ok=True)
                for f in sorted((p.folder / sub).iterdir()):
                    _link(f, out / sub / f.name)
    store.ledger.update({"sites": ledger_sites, "n": start, "done": False})
    write_json(out / LEDGER, store.ledger)  # the commit point, as in a single run
    t_copy = time.perf_counter() - t0
    store = P.open_store(cfg, iset, out, p1)
    if store.n_cells != n_total:
        raise RuntimeError(f"merge: {store.n_cells} cells committed for {n_total} copied")
    skipped = [r for p in parts for r in p.skipped]
    skipped.sort(key=lambda r: order.get(r["Metadata_ImageKey"], len(order)))
    P._finish(cfg, iset, out, store, p1, skipped)
    logger.info(
        "merged %d parts: %d sites, %d cells in %.1f s (crops %.1f s) → %s",
        len(parts),
        len(sites),
        n_total,
        time.perf_counter() - t0,
        t_copy,
        out,
    )
    return t_copy, time.perf_counter() - t0 - t_copy


# ---- an engine: Dask ----------------------------------------------------------------------


def _part_task(cfg) -> dict:
    """One part in a Dask worker (a plain function call, no subprocess)."""
    t0 = time.perf_counter()
    folder = run_part(cfg)
    done = _read_done(folder) or {}
    return {
        "part": cfg.part,
        "folder": str(folder),
        "n_sites": done.get("n_sites"),
        "n_cells": done.get("n_cells"),
        "seconds": time.perf_counter() - t0,
    }


def run_parts_dask(cfg, client=None, *, timings: dict | None = None) -> Path:
    """Plan, every part as one Dask task (`prepare.workers=1` each), then merge; returns the
    prep folder. `client`: a `distributed.Client`, or a scheduler address; None: the address
    in prepare.scheduler, else a local cluster of `prepare.workers` processes. A failed part
    fails the run after every other part ran (their work is kept): rerun to redo only it.
    `timings` (a dict) receives the plan, parts and merge wall times and each part's result."""
    from distributed import Client, LocalCluster, wait

    t0 = time.perf_counter()
    n = _n_parts(cfg)
    plan(dataclasses.replace(cfg, part=-1))
    t_plan = time.perf_counter() - t0
    own: list = []
    if client is None and not cfg.scheduler:
        cluster = LocalCluster(
            n_workers=max(1, cfg.workers),
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
        )
        own.append(cluster)
        client = Client(cluster)
        own.insert(0, client)
    elif client is None or isinstance(client, str):
        client = Client(client or cfg.scheduler)
        own.append(client)
    try:
        t1 = time.perf_counter()
        cfgs = [dataclasses.replace(cfg, part=i, workers=1) for i in range(n)]
        run = os.urandom(4).hex()  # keys of this run only: never an earlier run's result
        keys = [f"celldino-prepare-part-{i:04d}-{run}" for i in range(n)]
        futures = client.map(_part_task, cfgs, key=keys, pure=False)
        wait(futures)
        failed = [(i, f) for i, f in enumerate(futures) if f.status != "finished"]
        if failed:
            i, f = failed[0]
            err = f.exception()
            msg = " ".join(str(err).split())
            raise (PartsError if isinstance(err, UserError) else RuntimeError)(
                f"part(s) {_few([i for i, _ in failed])} of {n} failed (part {i}: "
                f"{type(err).__name__}: {msg}); the other parts are kept: fix the cause and run "
                "again (only the unfinished parts are redone)"
            ) from err
        results = client.gather(futures)
        t_parts = time.perf_counter() - t1
    finally:
        for c in own:
            c.close()
    t2 = time.perf_counter()
    detail: dict = {}
    out = merge(dataclasses.replace(cfg, part=-1), timings=detail)
    if timings is not None:
        timings.update(
            plan=t_plan,
            parts=t_parts,
            merge=time.perf_counter() - t2,
            merge_detail=detail,
            results=results,
        )
    return out
