"""One process of a multi-process trainer run, for tests/test_train_ddp.py.

Started N times with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` in the
environment (what torchrun sets), with one argument: a JSON file holding a list of jobs
``{"argv": [...], "port": P, "dump": DIR}``. For each job, in order, it trains with
``osd.train.run(argv)`` in a fresh gloo process group on ``MASTER_PORT=P`` and writes this
rank's weights and optimizer ``state_dict`` (projector bases included) to
``DIR/rank{RANK}.pt``, so the test can compare the ranks. Running several jobs in one
process pays Python's and torch's start-up once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from osd import cli_options, train


def main(jobs_file: str) -> int:
    cli_options.quiet_stderr(train.PROG)
    rank = int(os.environ["RANK"])
    for job in json.loads(Path(jobs_file).read_text()):
        os.environ["MASTER_PORT"] = str(job["port"])
        model, optimizer = train.run(job["argv"])
        dump = Path(job["dump"])
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, dump / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
