"""Body receipts: a body worker signs each split-training batch it served, so the coordinator can bound a device's
FedAvg weight by the work the server really did for it, wherever the workers run.

A receipt is `[seq, samples, mac]`: the batch's sequence number, its sample count, and an HMAC-SHA256 over the
federation, device, round, seq and count. The device collects the receipts of its round and sends them with its
update; it cannot make one up, move one to another round or borrow another device's. The key comes from the
service account's password, which the coordinator and every body worker already share; on an open broker (no
password) it comes from the federation's name alone and bounds only honest mistakes: there, anyone may publish
anything anyway.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any

Receipt = list        # [seq: int, samples: int, mac: str]


def receipt_key(federation: str, secret: str | None) -> bytes:
    return hashlib.sha256(b"sfprompt body receipts\0" + federation.encode() + b"\0" + (secret or "").encode()).digest()


def _mac(key: bytes, device: str, round_index: int, seq: int, samples: int) -> str:
    text = f"{device}\0{round_index}\0{seq}\0{samples}".encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()[:32]


def sign(key: bytes, device: str, round_index: int, seq: int, samples: int) -> Receipt:
    return [seq, samples, _mac(key, device, round_index, seq, samples)]


def served_samples(key: bytes, device: str, round_index: int, receipts: Any) -> int:
    """The samples the body trained for `device` in this round, by its receipts (each batch counted once).
    ValueError for anything that is not a receipt the workers signed."""
    if not isinstance(receipts, list):
        raise ValueError(f"{device}'s update carries no body receipts")
    counted: dict[int, int] = {}
    for receipt in receipts:
        if not (isinstance(receipt, list) and len(receipt) == 3 and all(type(v) is int for v in receipt[:2])
                and isinstance(receipt[2], str) and receipt[1] >= 0):
            raise ValueError(f"{device}'s update carries a malformed body receipt: {str(receipt)[:80]}")
        seq, samples, mac = receipt
        if not hmac.compare_digest(mac, _mac(key, device, round_index, seq, samples)):
            raise ValueError(f"{device}'s update carries a body receipt no worker signed (batch {seq})")
        counted[seq] = samples
    return sum(counted.values())
