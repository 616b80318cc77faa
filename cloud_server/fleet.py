"""The fleet as the broker retains it: which federations have a server, and one table of the server, every
enrolled device (seen or not: presence and last status), and the rounds. Read by `sfp-cloud fleet` and the demo."""
from __future__ import annotations

import time
from typing import Any

from sfp_common.errors import ConfigError
from wire_protocol.link import Link
from wire_protocol.topics import ROOT, Topics


def find_federation(link: Link, wait: float) -> str:
    """The one federation whose server status is retained on the broker, or a ConfigError saying which to pick."""
    servers: dict[str, Any] = {}
    link.subscribe_json(f"{ROOT}/+/server/status", lambda topic, value: servers.__setitem__(topic.split("/")[1], value))
    time.sleep(wait)
    if not servers:
        raise ConfigError("no federation's server status is retained on this broker: is `sfp-cloud serve` running, "
                          "and may this account read it? Name one with --federation")
    if len(servers) > 1:
        raise ConfigError(f"federations on this broker: {', '.join(sorted(servers))}; pick one with --federation")
    return next(iter(servers))


def read_retained(link: Link, topics: Topics, wait: float) -> dict[str, Any]:
    """Every retained JSON value under the federation's subtree, by topic (`wait`: seconds to collect them)."""
    seen: dict[str, Any] = {}
    link.subscribe_json(f"{topics.base}/#", lambda topic, value: seen.__setitem__(topic, value))
    time.sleep(wait)
    return seen


def format_round(summary: dict[str, Any], rounds: int) -> str:
    """A round in one line, as `serve` logs it and the demo prints it."""
    acc = summary.get("accuracy")
    evaluated = f" on {summary['evaluated_on']} test images" if acc is not None and summary.get("evaluated_on") else ""
    return (f"round {summary['round']}/{rounds}: {len(summary['participants'])}/{len(summary['selected'])} updates, "
            f"accuracy {'-' if acc is None else f'{acc:.4f}'}{evaluated}, "
            f"{summary.get('payload_up', 0) / 1e3:.1f} KB up + {summary.get('payload_down', 0) / 1e3:.1f} KB down "
            f"per device, {summary['seconds']:.1f} s")


def format_fleet(topics: Topics, seen: dict[str, Any]) -> str:
    server = seen.get(topics.server_status(), {})
    lines = [f"federation {topics.federation}: server {server.get('state', 'unknown')}, round "
             f"{server.get('round')}/{server.get('rounds')}, {server.get('enrolled', 0)} enrolled, "
             f"{server.get('online', 0)} online", "",
             f"{'device':<16} {'state':<11} {'activity':<15} {'round':>5} {'samples':>7} {'profile':<16} "
             f"{'MB sent':>8} {'MB recv':>8} {'last seen':>9}"]
    now = time.time()

    def per_device(leaf: str) -> dict[str, dict]:
        return {topic.split("/")[-2]: value for topic, value in seen.items()
                if topic.endswith(f"/{leaf}") and "/devices/" in topic and isinstance(value, dict)}
    statuses, presences = per_device("status"), per_device("presence")
    enrolled = seen.get(topics.enrolled(), [])
    for device in sorted(set(statuses) | set(presences) | set(enrolled if isinstance(enrolled, list) else [])):
        s, presence = statuses.get(device), presences.get(device, {})
        if s is None:
            lines.append(f"{device:<16} {'never seen':<11} {'-':<15} {'-':>5} {'-':>7} {'-':<16} {'-':>8} {'-':>8} "
                         f"{'-':>9}")
            continue
        state = "lost" if presence.get("cause") == "lost" else presence.get("state", "unknown")
        ago = f"{now - s['last_seen']:.0f}s ago" if s.get("last_seen") else "-"
        lines.append(f"{device:<16} {state:<11} {s.get('activity', '?'):<15} "
                     f"{str(s.get('round') or '-'):>5} {s.get('samples', 0):>7} {s.get('profile', '?'):<16} "
                     f"{s.get('bytes_sent', 0) / 1e6:>8.2f} {s.get('bytes_received', 0) / 1e6:>8.2f} {ago:>9}")
    rounds = sorted((t, v) for t, v in seen.items() if "/rounds/" in t)
    if rounds:
        lines += ["", f"{'round':>5} {'participants':>12} {'accuracy':>8} {'KB up/dev':>10} {'KB down/dev':>11} "
                      f"{'seconds':>8}"]
        for _, r in rounds:
            acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
            lines.append(f"{r['round']:>5} {len(r.get('participants', [])):>12} {acc:>8} "
                         f"{r.get('payload_up', 0) / 1e3:>10.1f} {r.get('payload_down', 0) / 1e3:>11.1f} "
                         f"{r.get('seconds', 0):>8.1f}")
    return "\n".join(lines)
