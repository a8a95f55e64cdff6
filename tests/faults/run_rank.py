"""Run the wandacli CLI as one rank of a torchrun job, instrumented for the distributed tests:

    torchrun --standalone --nproc-per-node 2 tests/faults/run_rank.py <wandacli arguments>

WANDACLI_TEST_WRITE_LOG=FILE  append "<rank> <path>" for every store file this rank writes
WANDACLI_TEST_FAIL_RANK=R     make rank R fail on its WANDACLI_TEST_FAIL_AFTER-th sample
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from wandacli.methods import wanda, wandg
    from wandacli.store import assemble, parts

    rank = os.environ.get("RANK", "0")
    log = os.environ.get("WANDACLI_TEST_WRITE_LOG")
    if log:
        original = parts.atomic_h5

        def logged(final, *args, **kwargs):
            with open(log, "a") as handle:
                handle.write(f"{rank} {final}\n")
            return original(final, *args, **kwargs)

        parts.atomic_h5 = logged
        assemble.atomic_h5 = logged
    if os.environ.get("WANDACLI_TEST_FAIL_RANK") == rank:
        after = int(os.environ.get("WANDACLI_TEST_FAIL_AFTER", "1"))
        calls = {"n": 0}
        for cls in (wanda.ActivationStatistics, wandg.GradientAccumulator):
            original_observe = cls.observe

            def failing(self, *args, _original=original_observe, **kwargs):
                calls["n"] += 1
                if calls["n"] >= after:
                    raise RuntimeError(f"injected failure on rank {rank}")
                return _original(self, *args, **kwargs)

            cls.observe = failing
    from wandacli.cli.main import main as cli_main

    sys.argv = ["wandacli", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
