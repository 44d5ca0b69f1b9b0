"""`avatarcli animate --gpus N`: the same command as N processes of one `torchrun` launch on this machine.

torch's elastic launcher (what `torchrun --standalone` runs) starts the processes and stops them all when one
fails; the command's exit status is that of the first process to fail, so a bad input stays exit 2 and an
out-of-memory exit 3.
"""

from __future__ import annotations

import os
import sys

from avatarcli.errors import EXIT_INTERRUPTED


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m avatarcli ARGV` as `processes` ranks; 0, or the exit status of the first rank that failed."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # CPU processes share the cores (torchrun's own default would be one thread each).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    logging.disable(logging.CRITICAL)  # the processes report their own errors, one line each
    try:
        elastic_launch(config, sys.executable)("-m", "avatarcli", *argv)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else EXIT_INTERRUPTED  # < 0: stopped by a signal
    except SignalException:
        return EXIT_INTERRUPTED
    finally:
        logging.disable(logging.NOTSET)
    return 0
