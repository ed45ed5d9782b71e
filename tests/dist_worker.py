"""Run under torchrun by tests/test_distributed.py: shard a list, compute per item, gather on rank 0.

Rank 0 writes ``{"world": N, "values": [...], "mine": [...]}`` to the JSON file given as argv[1];
every rank appends its shard's indices to ``<argv[1]>.rank<R>`` so the test sees who did what.
``train OUT DATA``: tests/test_distributed_train.py's training runs (:func:`rank_main` there).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cbam_viz import distributed
from tests import test_distributed_train


def main() -> None:
    out = Path(sys.argv[1])
    ctx = distributed.context()
    items = list(range(11))  # not a multiple of 2 or 3: uneven shards
    mine = distributed.shard(items, ctx)
    Path(f"{out}.rank{ctx.rank}").write_text(json.dumps([i for i, _ in mine]))
    values = distributed.gather_ordered([(i, float(torch.tensor(x) ** 2)) for i, x in mine], ctx)
    doubled = distributed.map_sharded(lambda x: 2 * x, items, ctx)
    if distributed.is_main():
        out.write_text(json.dumps({"world": ctx.world, "backend": ctx.backend, "values": values, "doubled": doubled}))
    else:
        assert values is None and doubled is None
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "train":  # tests/test_distributed_train.py: ``train OUT DATA``
        test_distributed_train.rank_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
