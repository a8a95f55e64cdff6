"""Run the wandacli CLI with a fault injected, for the fault-injection tests:

    python tests/faults/run_cli.py MODULE:FUNCTION:N[:after] -- <wandacli arguments>

SIGKILLs the process on the N-th call of MODULE.FUNCTION (before the call runs, or just after
it returns with `:after`), so that a kill lands at an exact moment: mid-assembly, between a
write and its rename, inside a model save.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def inject(spec: str) -> None:
    """Make MODULE.FUNCTION SIGKILL this process on its N-th call (before it, or `:after`)."""
    module_name, attribute, count, *when = spec.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    calls = 0

    def killer(*positional, **keywords):
        nonlocal calls
        calls += 1
        if calls == int(count) and not when:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*positional, **keywords)
        if calls == int(count) and when == ["after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, attribute, killer)


def main() -> None:
    spec, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: run_cli.py MODULE:FUNCTION:N[:after] -- ARGS"
    inject(spec)
    from wandacli.cli.main import main as cli_main

    sys.argv = ["wandacli", *args]
    cli_main()


if __name__ == "__main__":
    main()
