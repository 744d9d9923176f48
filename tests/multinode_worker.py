"""torchrun entry of tests/test_multinode.py: `celldino extract` in which one node is lost.

    torchrun ... tests/multinode_worker.py <rank that dies> extract.checkpoint=... ...

The rank named dies right after writing its first shard, the way a node does: its torchrun agent
(the parent) and then the process itself are killed with SIGKILL (no cleanup, no exit code of its
own). The other ranks go on as in any torchrun job whose peer vanished. The rest of the arguments
are `celldino extract`'s dotlist overrides.
"""

from __future__ import annotations

import os
import signal
import sys

from celldino.config import load_config
from celldino.extract import extract


def main() -> None:
    dies = int(sys.argv[1])
    cfg = load_config(None, sys.argv[2:]).extract

    def lose_node(k: int) -> None:
        if int(os.environ["RANK"]) == dies:
            os.kill(os.getppid(), signal.SIGKILL)  # the node's agent
            os.kill(os.getpid(), signal.SIGKILL)

    extract(cfg, after_shard=lose_node)


if __name__ == "__main__":
    main()
