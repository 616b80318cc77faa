"""`sfp-cloud serve` (the coordinator and a body worker), `sfp-cloud worker` (more body capacity),
`sfp-cloud fleet` (the fleet's retained status as a table), `sfp-cloud secure` (TLS certificates and broker
accounts) and `sfp-cloud token` (a device's single-use enrollment token)."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import click

from cloud_server.config import FederationConfig
from export.cli import split_options
from sfp_common.cli import (configure_logging, default_of, log_format_option, recipe_from_options, recipe_options,
                            run_cli)
from sfp_common.errors import ConfigError
from sfp_common.token_store import DEFAULT_MAX_BYTES

log = logging.getLogger("sfp-cloud")


def model_options(f):
    f = click.option("--seed", default=default_of(FederationConfig, "seed"),
                     help="Seeds the prompts and classifier, and the rounds' batch orders.")(f)
    f = click.option("--random-init", is_flag=True, help="Do not load pretrained weights (pipeline checks only).")(f)
    f = click.option("--img-size", type=int, default=None, help="Input size, if not the model's own.")(f)
    f = click.option("--classes", required=True,
                     help="The task's classes: a count N (named 0..N-1) or comma-separated names.")(f)
    f = click.option("--model", required=True, help="A timm model name or a checkpoint file (see sfp-pretrain).")(f)
    f = split_options(f)
    f = click.option("--federation", default="demo", help="The federation's id (its topic subtree).")(f)
    f = click.option("--broker", required=True, help="mqtt://host[:port] (mqtts:// for TLS).")(f)
    return f


def access_options(f):
    """How server-side processes get into a secured broker (mqtts://, accounts made by `sfp-cloud secure`)."""
    f = click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The service account's password [default: $SFP_BROKER_PASSWORD, or "
                          "<state>/security/server.password when there is one].")(f)
    f = click.option("--username", default="sfp-server", help="The broker account (secured brokers).")(f)
    f = click.option("--ca", type=click.Path(dir_okay=False, exists=True), default=None,
                     help="The CA that signed the broker's certificate [default: <state>/security/ca.crt when "
                          "there is one, else the system's].")(f)
    return f


def broker_access(broker: str, ca: str | None, username: str, password_file: Path | None,
                  state_dir: Path | None = None):
    from wire_protocol.link import BrokerAccess, parse_broker
    security = state_dir / "security" if state_dir else None
    if ca is None and security and parse_broker(broker)[2]:
        from cloud_server.dynsec import SETTINGS
        plugin = json.loads((security / SETTINGS).read_text()) if (security / SETTINGS).exists() else {}
        ca = plugin.get("ca") or (str(security / "ca.crt") if (security / "ca.crt").exists() else None)
    if password_file is None and security and (security / "server.password").exists():
        password_file = security / "server.password"
    password = os.environ.get("SFP_BROKER_PASSWORD")
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read the broker password from {password_file}: {err}") from None
    return BrokerAccess(username if password is not None else None, password, ca)


def reload_command(command: str | None):
    """`--broker-reload` as a hook: run after the broker's accounts changed (e.g. `systemctl reload mosquitto`)."""
    if not command:
        return None

    def reload() -> None:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("broker reload %r failed (%d): %s", command, done.returncode, done.stderr.strip())
    return reload


def body_options(f):
    f = click.option("--body-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32",
                     help="The body's compute precision (bf16: autocast on the accelerator).")(f)
    f = click.option("--device", "torch_device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1.")(f)
    f = click.option("--token-store-mb", type=click.IntRange(min=0), default=DEFAULT_MAX_BYTES >> 20,
                     help="Memory for the tokens kept for devices that opted in (--server-keeps-tokens); past it "
                          "the devices seen longest ago are forgotten (they send their tokens again).")(f)
    return f


def class_names(classes: str) -> tuple[str, ...]:
    if classes.isdigit():
        return tuple(str(i) for i in range(int(classes)))
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"--classes needs a count or at least two distinct names, got {classes!r}")
    return names


def federation_config(federation: str, state_dir: Path, model: str, classes: str, prompts: int, head_blocks: int,
                      tail_blocks: int, img_size: int | None, random_init: bool, seed: int, rounds: int,
                      fraction: float, min_devices: int, deadline: float, no_device_eval: bool, backends: str,
                      training_python: str | None, **recipe_settings) -> FederationConfig:
    """`serve`'s options as the one typed configuration."""
    from sfp_common.recipe import Recipe
    from sfp_common.split_spec import SplitSpec
    return FederationConfig(
        federation=federation, model=model, classes=class_names(classes), state_dir=state_dir,
        split=SplitSpec(prompts, head_blocks, tail_blocks), recipe=recipe_from_options(Recipe(), **recipe_settings),
        img_size=img_size, pretrained=not random_init, seed=seed, rounds=rounds, fraction=fraction,
        min_devices=min_devices, round_deadline_s=deadline, evaluate_on_devices=not no_device_eval,
        backends=tuple(b for b in backends.split(",") if b), training_python=training_python)


def config_file_option(f):
    """--config FILE.toml: settings named as the command's options (`min-devices = 5` or `min_devices = 5`),
    read before the command line, which wins; an unknown name is refused."""
    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        try:
            import tomllib
        except ModuleNotFoundError:          # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(value).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise click.BadParameter(f"cannot read {value}: {err}", ctx, param) from None
        names = {}
        for p in ctx.command.params:
            names[p.name] = p.name
            for opt in p.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = p.name
        unknown = sorted(k for k in data if k.replace("-", "_") not in names or k == "config")
        if unknown:
            raise click.BadParameter(f"{value} names no such setting: {', '.join(unknown)} (the settings are "
                                     f"the options of `{ctx.command_path} --help`)", ctx, param)
        ctx.default_map = {**(ctx.default_map or {}), **{names[k.replace("-", "_")]: v for k, v in data.items()}}
    return click.option("--config", type=click.Path(dir_okay=False, exists=True), is_eager=True, expose_value=False,
                        callback=load, help="A TOML file of settings, named as these options (rounds = 20, "
                                            "min-devices = 5); the command line wins.")(f)


@click.group()
@log_format_option
def main(log_format: str) -> None:
    """The cloud side of a split federated prompt tuning federation."""
    configure_logging(log_format)


@main.command(context_settings={"show_default": True})
@model_options
@body_options
@access_options
@click.option("--broker-reload", default=None,
              help="A command that makes the broker re-read its accounts (run after each enrollment).")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Registry, bundles, checkpoints and round summaries (resumed from on restart).")
@click.option("--rounds", default=default_of(FederationConfig, "rounds"))
@recipe_options
@click.option("--fraction", type=float, default=default_of(FederationConfig, "fraction"),
              help="Share of the online devices selected per round.")
@click.option("--min-devices", default=default_of(FederationConfig, "min_devices"),
              help="Devices online before a round starts.")
@click.option("--deadline", type=float, default=default_of(FederationConfig, "round_deadline_s"),
              help="Seconds a round waits for its devices.")
@click.option("--no-device-eval", is_flag=True, help="Skip the devices' evaluation of each new global model.")
@click.option("--backends", default=",".join(default_of(FederationConfig, "backends")),
              help="Bundles exported at start (others on first enrollment).")
@click.option("--training-python", envvar="SFP_ORT_TRAINING_PYTHON", default=None,
              help="For training-backend bundles: a Python with onnxruntime-training.")
@click.option("--workers", default=1, help="Body workers in this process (0: run them with `sfp-cloud worker`).")
@click.option("--max-packet", default=1 << 20, help="The broker's packet limit; messages over it (or over 512 KiB) travel in chunks.")
@click.option("--metrics-port", default=0, help="Serve Prometheus metrics on 127.0.0.1:PORT (0: off).")
@config_file_option
def serve(broker, federation, torch_device, body_dtype, token_store_mb, ca, username, password_file, broker_reload,
          state_dir, workers, max_packet, metrics_port, **settings) -> None:
    """Coordinate rounds, serve bundles to enrolling devices, and run the ViT body. The recipe options default
    to SFPrompt's recipe (sfp_common/recipe.py), the reference federation's."""
    from cloud_server.body import start_worker
    from cloud_server.bundles import federation_bundles
    from cloud_server.coordinator import Coordinator
    from cloud_server.fleet import format_round
    from cloud_server.metrics import Metrics

    def job() -> None:
        cfg = federation_config(federation=federation, state_dir=state_dir, **settings)
        metrics = Metrics()
        if metrics_port:
            metrics.serve(metrics_port)
        access = broker_access(broker, ca, username, password_file, state_dir)
        coordinator = Coordinator(cfg, broker, federation_bundles(cfg), metrics,
                                  on_round=lambda s: log.info("%s", format_round(s, cfg.rounds),
                                                              extra={"fields": {"summary": s}}),
                                  max_packet=max_packet, access=access, reload_broker=reload_command(broker_reload))
        for sig in (signal.SIGINT, signal.SIGTERM):      # `kill`, `systemctl stop`, Ctrl-C: a clean stop
            signal.signal(sig, lambda *_: coordinator.stop.set())
        coordinator.start()
        bodies = [start_worker(broker, federation, coordinator.bundles.model, f"{federation}-w{i}", torch_device,
                               body_dtype, max_packet, access, metrics, token_store_mb << 20) for i in range(workers)]
        log.info("serving federation %s: %d rounds, state in %s", federation, cfg.rounds, state_dir)
        try:
            coordinator.run()
        finally:
            for body in bodies:
                body.stop()
            coordinator.close()
    run_cli(job)


@main.command(context_settings={"show_default": True})
@model_options
@body_options
@access_options
@click.option("--worker-id", default=None, help="Unique per worker [default: host name and process id].")
@click.option("--max-packet", default=1 << 20)
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The server's state folder, for the CA and service password under its security/.")
def worker(broker, federation, prompts, head_blocks, tail_blocks, model, classes, img_size, random_init, seed,
           torch_device, body_dtype, token_store_mb, ca, username, password_file, worker_id, max_packet,
           state_dir) -> None:
    """An extra body worker: takes forward requests from the shared subscription until stopped."""
    from cloud_server.body import start_worker
    from export.backbone import resolve_model
    from export.bundle import client_model
    from sfp_common.split_spec import SplitSpec

    def job() -> None:
        split, _ = client_model(resolve_model(model), len(class_names(classes)),
                                SplitSpec(prompts, head_blocks, tail_blocks), img_size, not random_init, seed)
        name = worker_id or f"{os.uname().nodename}-{os.getpid()}"
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        body = start_worker(broker, federation, split, name, torch_device, body_dtype, max_packet,
                            broker_access(broker, ca, username, password_file, state_dir),
                            token_store_bytes=token_store_mb << 20)
        try:
            stop.wait()
        finally:
            body.stop()                  # its retained status says "stopped"
            body.link.close()
    run_cli(job)


@main.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/federation-demo"))
@click.option("--model", default="models/vit-fmnist.pth", help="The backbone (make backbone pretrains it).")
@click.option("--devices", default=4)
@click.option("--rounds", default=5)
@click.option("--alpha", type=float, default=0.5, help="Dirichlet label skew of the devices' shares.")
@click.option("--prompts", default=10)
@click.option("--profile", default="auto", help="The devices' firmware profile.")
@click.option("--seed", default=0)
@click.option("--tls/--no-tls", default=True, help="A secured broker (local CA, accounts, ACLs) or an open one.")
@recipe_options
def demo(out, model, devices, rounds, alpha, prompts, profile, seed, tls, **recipe_settings) -> None:
    """A whole federation here: broker, server and device processes, progress, a table and a plot. The recipe
    options are passed to `sfp-cloud serve` (none given: SFPrompt's default recipe)."""
    from cloud_server.demo import run_demo
    serve_args = tuple(arg for name, value in recipe_settings.items() if value is not None
                       for arg in ((f"--{name.replace('_', '-')}",) if value is True else
                                   (f"--{name.replace('_', '-')}", str(value))))
    run_cli(lambda: run_demo(out, model, devices, rounds, alpha, seed, prompts, profile, click.echo, tls,
                             serve_args))


@main.command()
@click.option("--broker", required=True)
@click.option("--federation", default=None,
              help="[default: the one federation whose server status is on the broker; several: say which]")
@click.option("--wait", type=float, default=1.0, help="Seconds to collect the retained messages.")
@access_options
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The server's state folder, for the CA and service password under its security/.")
def fleet(broker, federation, wait, ca, username, password_file, state_dir) -> None:
    """Print the fleet's status, as retained in the broker: every enrolled device, seen or not."""
    from cloud_server.fleet import find_federation, format_fleet, read_retained
    from wire_protocol.link import Link
    from wire_protocol.topics import Topics

    def job() -> None:
        link = Link(broker, f"fleet-{os.getpid()}",
                    access=broker_access(broker, ca, username, password_file, state_dir)).connect()
        try:
            topics = Topics(federation or find_federation(link, wait))
            seen = read_retained(link, topics, wait)
        finally:
            link.close()
        if topics.server_status() not in seen:
            raise ConfigError(f"no server status for federation {topics.federation!r} on this broker: is "
                              f"`sfp-cloud serve --federation {topics.federation}` running?")
        click.echo(format_fleet(topics, seen))
    run_cli(job)


@main.command(context_settings={"show_default": True})
@click.option("--broker", required=True, help="mqtt://host[:port] (mqtts:// for TLS).")
@click.option("--federation", default="demo")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The server's state folder (secured brokers): its CA, and the page's read-only account is made "
                   "in its security/.")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The CA of the broker's certificate [default: the state folder's].")
@click.option("--broker-reload", default=None, help="A command that makes the broker re-read its accounts.")
@click.option("--bind", default="127.0.0.1", help="The page's address (its account's password is in its config).")
@click.option("--port", default=8080, help="The page's port (0: any free one).")
def dashboard(broker, federation, state_dir, ca, broker_reload, bind, port) -> None:
    """Serve the fleet page: every device, the server and its workers, accuracy and bytes per round, live from the
    broker (MQTT over WebSockets, as a read-only account)."""
    import asyncio

    from cloud_server.dashboard import FleetPage, PageConfig
    from cloud_server.security import DASHBOARD, SERVICE, Security
    from wire_protocol.link import parse_broker

    def job() -> None:
        try:
            tls = parse_broker(broker)[2]
        except ValueError as err:
            raise ConfigError(str(err)) from None
        username = password = None
        if tls:
            security = state_dir / "security" if state_dir else None
            if security is None or not (security / "accounts.json").exists():
                raise ConfigError("a secured broker: give --state, the server's state folder (the one `sfp-cloud "
                                  "secure` wrote), where the page's read-only account is made")
            username = DASHBOARD
            password = Security(security, federation, reload_command(broker_reload)).add_dashboard()
        page = FleetPage(PageConfig(broker, federation, username, password),
                         broker_access(broker, ca, SERVICE, None, state_dir).ca_file)
        try:
            asyncio.run(page.serve(bind, port, ready=lambda actual: click.echo(
                f"fleet page: http://{bind}:{actual}/ (federation {federation} at {broker}); Ctrl-C to stop",
                nl=True)))
        except OSError as err:
            raise ConfigError(f"cannot serve the fleet page on {bind}:{port}: {err.strerror or err}") from None
    run_cli(job)


@main.command("secure", context_settings={"show_default": True})
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--federation", default="demo")
@click.option("--hostname", "hostnames", multiple=True, default=("localhost", "127.0.0.1"),
              help="A name or IP address devices reach the broker by (repeat for several).")
@click.option("--port", default=8883, help="The broker's TLS port.")
@click.option("--bind", default="", help="The address the listener binds to.  [default: every interface]")
@click.option("--broker-group", default=None,
              help="The group the broker runs as, which must read its key, passwd and acl (mode 0640).  [default: "
                   "mosquitto when run as root and that group exists (Mosquitto started as root drops to it)]")
@click.option("--dynamic-security", "plugin_broker", default=None, metavar="URL",
              help="Instead of files: keep the accounts in the dynamic-security plugin of the running broker at URL "
                   "(reached with --admin-user, --admin-password-file, --ca).")
@click.option("--admin-user", default="admin", help="The plugin's admin account (mosquitto_ctrl dynsec init).")
@click.option("--admin-password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Its password [default: $SFP_BROKER_PASSWORD].")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The CA of the broker's certificate, for an mqtts:// URL [default: the system's].")
def secure_command(state_dir, federation, hostnames, port, bind, broker_group, plugin_broker, admin_user,
                   admin_password_file, ca) -> None:
    """TLS certificates, the service account, and the password, ACL and listener files for Mosquitto; or, with
    --dynamic-security, the service account in a running broker's dynamic-security plugin."""
    from cloud_server.security import SERVICE, default_broker_group, secure, secure_with_plugin

    def job() -> None:
        folder = state_dir / "security"
        if plugin_broker:
            admin = broker_access(plugin_broker, ca, admin_user, admin_password_file)
            if admin.password is None:
                raise ConfigError("the plugin's admin password: give --admin-password-file or set "
                                  "SFP_BROKER_PASSWORD")
            secure_with_plugin(folder, federation, plugin_broker, admin)
            click.echo(f"the '{SERVICE}' account now manages federation {federation}'s accounts in the dynamic-"
                       f"security plugin of {plugin_broker}\n"
                       f"  {folder}/server.password its password (sfp-cloud serve/worker/fleet read it from here)\n"
                       f"then issue each device a token: sfp-cloud token --state {state_dir} --device <id>")
            return
        secure(folder, federation, tuple(hostnames), port, bind, broker_group or default_broker_group())
        click.echo(f"written to {folder}/:\n"
                   f"  mosquitto.conf  a TLS listener on {bind or 'every interface'}:{port} with passwd and acl: "
                   f"cp it to /etc/mosquitto/conf.d/sfp.conf (Debian's broker reads that folder) and restart\n"
                   f"  ca.crt          give it to every device (sfp-edge enroll --ca) and body worker (--ca)\n"
                   f"  server.password the '{SERVICE}' account of sfp-cloud serve/worker/fleet (read from here "
                   f"by serve)\n"
                   f"then issue each device a token: sfp-cloud token --state {state_dir} --device <id>")
    run_cli(job)


@main.command(context_settings={"show_default": True})
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--federation", default="demo")
@click.option("--device", "device_id", required=True, help="The device the token enrolls (its id).")
@click.option("--ttl", type=float, default=86400.0, help="Seconds until the token expires.")
@click.option("--broker-reload", default=None, help="A command that makes the broker re-read its accounts.")
def token(state_dir, federation, device_id, ttl, broker_reload) -> None:
    """Print a single-use enrollment token for one device (also its one-off broker account's password)."""
    from cloud_server.security import Security

    def job() -> None:
        try:
            value = Security(state_dir / "security", federation, reload_command(broker_reload)).issue_token(
                device_id, ttl)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        click.echo(value)
    run_cli(job)


if __name__ == "__main__":
    main()
