"""How every command-line tool reports bad input: one line, exit status 2, no traceback."""
from __future__ import annotations

import logging
import os
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


OUR_LOGGERS = ("sfp-cloud", "cloud_server", "edge_client", "wire_protocol", "export")


def configure_logging() -> None:
    """Our services log at SFP_LOG (default INFO); libraries only their warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(os.environ.get("SFP_LOG", "INFO"))
