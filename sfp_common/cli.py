"""What every command-line tool shares: bad input reported in one line with exit status 2 and no traceback, the
logging set-up, and the options that set a recipe (sfp_common/recipe.py)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import MISSING, fields, replace
from typing import Any, Callable, TypeVar

import click

from sfp_common.bundle import OPTIMIZERS
from sfp_common.errors import ConfigError, ServiceError
from sfp_common.recipe import LOCAL_UPDATES, PRUNE_RULES, SELECT_RULES, Recipe
from wire_protocol.codec import FLOAT_WIRES

T = TypeVar("T")


def run_cli(job: Callable[[], T]) -> T:
    try:
        return job()
    except (ConfigError, ServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def default_of(cls: type, name: str) -> Any:
    """A dataclass field's default, for a command-line option: each default is written once, in its dataclass."""
    field_ = next(f for f in fields(cls) if f.name == name)
    value = field_.default if field_.default is not MISSING else field_.default_factory()
    assert value is not MISSING, name
    return value


OUR_LOGGERS = ("sfp-cloud", "cloud_server", "edge_client", "wire_protocol", "export")
LOG_FORMATS = ("text", "json")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time (UTC, ISO 8601), level, logger, message, and the
    structured fields a call passes as `extra={"fields": {...}}` (a round's summary, say)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = {"time": stamp, "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(fmt: str = "text") -> None:
    """Our services log at SFP_LOG (default INFO); libraries only their warnings. `fmt`: text lines for people,
    or JSON lines."""
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}; choose one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])     # a no-op where logging is set up already
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(os.environ.get("SFP_LOG", "INFO"))


def log_format_option(f: Callable) -> Callable:
    """--log-format text|json on a command group (or SFP_LOG_FORMAT)."""
    return click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", envvar="SFP_LOG_FORMAT",
                        show_default=True, help="Log lines for people, or JSON lines for log shippers.")(f)


def recipe_options(f: Callable) -> Callable:
    """--lr, --optimizer, ... --wire: each omitted one keeps the base recipe's value (`recipe_from_options`), so
    the defaults live in sfp_common/recipe.py alone."""
    options = [
        click.option("--lr", type=float, default=None, help="Learning rate."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None),
        click.option("--weight-decay", type=float, default=None),
        click.option("--momentum", type=float, default=None, help="SGD's momentum."),
        click.option("--batch-size", type=int, default=None, help="(A device uses its profile's.)"),
        click.option("--epochs", type=int, default=None,
                     help="Passes over the (kept) data per round: split training, or the whole model on-device."),
        click.option("--prune", type=click.Choice(PRUNE_RULES), default=None,
                     help="Which samples split training sees (sfp_common/recipe.py)."),
        click.option("--keep", type=float, default=None, help="The fraction pruning keeps, in (0, 1]."),
        click.option("--select", type=click.Choice(SELECT_RULES), default=None,
                     help="Pruning keeps the highest or the lowest scores."),
        click.option("--local-update", type=click.Choice(LOCAL_UPDATES), default=None,
                     help="SFPrompt's local-loss update (sfp_common/recipe.py)."),
        click.option("--local-epochs", type=int, default=None, help="Passes of the local-loss update."),
        click.option("--wire", type=click.Choice(FLOAT_WIRES), default=None,
                     help="Smashed tokens and features on the wire (a device uses its profile's)."),
        click.option("--token-noise", type=float, default=None,
                     help="A defence against inversion: Gaussian noise on the smashed patch tokens, std x their "
                          "RMS (sfp_common/defence.py; what it buys: sfp-audit)."),
        click.option("--server-keeps-tokens", is_flag=True, default=None,
                     help="Opt in to the server keeping each sample's patch tokens after their first upload, so later "
                          "rounds send only ids and prompts (no head blocks; devices must agree too). The server "
                          "can then rebuild the images exactly: README, Privacy."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


RECIPE_OPTIONS = ("lr", "optimizer", "weight_decay", "momentum", "batch_size", "epochs", "prune", "keep", "select",
                  "local_update", "local_epochs", "wire", "token_noise", "server_keeps_tokens")


def recipe_from_options(base: Recipe, optimizer: str | None = None, weight_decay: float | None = None,
                        momentum: float | None = None, **settings: Any) -> Recipe:
    """`base` with the settings given on the command line (None: not given)."""
    spec = base.optimizer
    changed = {k: v for k, v in (("name", optimizer), ("weight_decay", weight_decay), ("momentum", momentum))
               if v is not None}
    if changed:
        settings["optimizer"] = replace(spec, **changed)
    return base.but(**settings)
