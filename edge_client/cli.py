"""`sfp-edge enroll` (register, receive and verify the bundle), `sfp-edge run` (take part in rounds until
stopped) and `sfp-edge status` (what this device is and holds)."""
from __future__ import annotations

import json
import os
import platform
import signal
import threading
from pathlib import Path

import click

from sfp_common.cli import configure_logging, log_format_option, run_cli

DEFAULT_STATE = Path(os.environ.get("SFP_EDGE_STATE", Path.home() / ".sfp-edge"))
state_option = click.option("--state", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE,
                            show_default=True, help="The device's state folder (config and bundle).")


@click.group()
@log_format_option
def main(log_format: str) -> None:
    """A device of a split federated prompt tuning federation (numpy + onnxruntime; never torch)."""
    configure_logging(log_format)


@main.command(context_settings={"show_default": True})
@click.option("--broker", required=True, help="mqtt://host[:port] (mqtts:// for TLS).")
@click.option("--token", envvar="SFP_ENROLL_TOKEN", required=True,
              help="This device's single-use enrollment token (from `sfp-cloud token`).")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The CA that signed the broker's certificate (mqtts://), e.g. the server's ca.crt.")
@click.option("--profile", default="auto", help="A firmware profile name, a profile .json file, or auto.")
@click.option("--data", type=click.Path(file_okay=False), required=True,
              help="This device's images: DATA/train/<class>/* (and optionally DATA/test/<class>/*).")
@click.option("--federation", default="demo")
@click.option("--device-id", default=None, help="[default: this host's name]")
@click.option("--timeout", type=float, default=300.0, help="Seconds to wait for the server's answer.")
@click.option("--let-server-keep-tokens", is_flag=True,
              help="Agree that, where the federation asks, the server keeps this device's patch tokens after their "
                   "first upload (later rounds send ids and prompts only). The server can then rebuild the images "
                   "exactly: README, Privacy.")
@state_option
def enroll(broker, token, ca, profile, data, federation, device_id, timeout, let_server_keep_tokens, state) -> None:
    """Register this device and receive its client bundle."""
    from edge_client.enrollment import enroll as do_enroll
    from edge_client.profiles import load_profile

    def job() -> None:
        chosen = load_profile(profile)
        device = device_id or platform.node().split(".")[0] or "device"
        config = do_enroll(broker, token, chosen, data, state, device, federation, timeout, ca,
                           let_server_keep_tokens)
        click.echo(f"enrolled {config.device} in federation {config.federation} ({chosen.name}, "
                   f"{chosen.backend} backend, {config.num_samples} samples); state in {state}")
    run_cli(job)


@main.command(context_settings={"show_default": True})
@state_option
@click.option("--round-timeout", type=float, default=120.0,
              help="Seconds to wait for the server's answer to a split batch before dropping the round.")
def run(state, round_timeout) -> None:
    """Take part in rounds until stopped (Ctrl-C or SIGTERM leave cleanly, status offline)."""
    from edge_client.agent import DeviceAgent

    def job() -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        agent = DeviceAgent(state, stop, round_timeout_s=round_timeout)
        click.echo(f"{agent.config.device}: in federation {agent.config.federation} at {agent.config.broker}, "
                   f"{len(agent.y_train)} training samples; Ctrl-C to leave")
        agent.run()
        click.echo(f"{agent.config.device}: left the federation")
    run_cli(job)


@main.command()
@state_option
def status(state) -> None:
    """This device's enrollment, profile and bundle."""
    from edge_client.device_state import BUNDLE, DeviceConfig
    from sfp_common.bundle import read_bundle

    def job() -> None:
        config = DeviceConfig.load(state)
        manifest = read_bundle(state / BUNDLE)
        click.echo(json.dumps({"device": config.device, "federation": config.federation, "broker": config.broker,
                               "profile": config.profile["name"], "data": config.data,
                               "samples": config.num_samples, "bundle": {
                                   "backend": manifest.backend, "model": manifest.model_id,
                                   "prompts": manifest.prompts, "head_blocks": manifest.head_blocks,
                                   "tail_blocks": manifest.tail_blocks}}, indent=2))
    run_cli(job)


if __name__ == "__main__":
    main()
