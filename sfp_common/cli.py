"""How every command-line tool reports bad input: one line, exit status 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from sfp_common.errors import ConfigError

T = TypeVar("T")


def run_cli(job: Callable[[], T]) -> T:
    try:
        return job()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
