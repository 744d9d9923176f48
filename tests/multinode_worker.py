"""torchrun entry of tests/test_multinode.py: `celldino extract` or `celldino train` on each rank,
saying what the rank computed.

    torchrun ... tests/multinode_worker.py <rank that dies, or -1> extract.checkpoint=... ...
    torchrun ... tests/multinode_worker.py train CONFIG.yaml

extract: every rank r prints `SHARD <r> <k>` after writing shard k. The rank named dies right
after writing its first shard, the way a node does: its torchrun agent (the parent) and then the
process itself are killed with SIGKILL (no cleanup, no exit code of its own); the other ranks go
on as in any torchrun job whose peer vanished (-1: no rank dies). The rest of the arguments are
`celldino extract`'s dotlist overrides.

train: `celldino train CONFIG.yaml` (the command line's own path), every rank printing
`ROWS <r> <dataset rows>` for each batch its loader yields (the training loop's collate, wrapped
to report its batch and otherwise unchanged).
"""

from __future__ import annotations

import os
import signal
import sys

from celldino import log
from celldino.config import load_config
from celldino.extract import extract


def main() -> None:
    rank = int(os.environ["RANK"])
    if sys.argv[1] == "train":
        from celldino.cli import main as cli
        from celldino.train import loop

        collate = loop._collate

        def reporting(items):
            batch = collate(items)
            print(f"ROWS {rank} {batch[-2].flatten().tolist()}", flush=True)
            return batch

        loop._collate = reporting
        raise SystemExit(cli(["train", *sys.argv[2:]]))

    dies = int(sys.argv[1])
    cfg = load_config(None, sys.argv[2:]).extract
    log.setup()  # the command line's logging: rank and progress lines as `celldino extract`'s

    def after_shard(k: int) -> None:
        print(f"SHARD {rank} {k}", flush=True)
        if rank == dies:
            os.kill(os.getppid(), signal.SIGKILL)  # the node's agent
            os.kill(os.getpid(), signal.SIGKILL)

    extract(cfg, after_shard=after_shard)


if __name__ == "__main__":
    main()
