"""The paper's counting at its scale: one client's round for ViT-B/16 and ViT-L/16 at 224, nothing trained.

    python bench/counting.py --models vit_base_patch16_224,vit_large_patch16_224

`simulation/counting.py` runs a client's whole round on meta tensors (FLOPs from the ops actually run, bytes from
the exact tensors that cross). 10 classes, 500 samples per client, one pass of split training, EL2N keeps half,
P = 10 prompts, no head or tail blocks (the paper's regime); FL is federated full fine-tuning, one local epoch.
SFPrompt is counted with our traffic (fp16 and int8 tokens; fp16 with the opt-in that lets the server keep the
patch tokens, Recipe.server_keeps_tokens, in a round after the first) and the paper's (four fp32 activation-sized
transfers per batch). Output: <out>/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.device_step import machine_facts  # noqa: E402
from export.backbone import resolve_model  # noqa: E402
from sfp_common.split_spec import SplitSpec  # noqa: E402
from simulation.counting import count_client_round  # noqa: E402
from simulation.methods import get_method  # noqa: E402

# (label, method, traffic, wire, server keeps tokens): what each table row counts.
VARIANTS = (("ours, fp16 tokens", "sfprompt", "ours", "fp16", False),
            ("ours, int8 tokens", "sfprompt", "ours", "int8", False),
            ("ours, tokens kept by the server (opt-in, after round 1)", "sfprompt", "ours", "fp16", True),
            ("paper (four fp32 transfers)", "sfprompt", "paper", "fp32", False), ("FL", "fl", "ours", "fp16", False))
PAPER = {"vit_base_patch16_224": {"flops": 0.0046, "bytes": 0.47}, "vit_large_patch16_224": {"bytes": 0.19}}


def count(model: str, samples: int, keep: float, prompts: int, classes: int = 10) -> list[dict]:
    rows = []
    for label, method, traffic, wire, keeps in VARIANTS:
        recipe = get_method(method).recipe.but(keep=keep, epochs=1, wire=wire, server_keeps_tokens=keeps)
        meter = count_client_round(method, resolve_model(model), classes, SplitSpec(prompts), recipe, samples,
                                   traffic=traffic)
        rows.append({"model": model, "variant": label, "method": method, "client_flops": meter.flops,
                     "bytes_up": meter.bytes_up, "bytes_down": meter.bytes_down})
    fl = rows[-1]
    for r in rows:
        r["flops_vs_fl"] = r["client_flops"] / fl["client_flops"]
        r["bytes_vs_fl"] = (r["bytes_up"] + r["bytes_down"]) / (fl["bytes_up"] + fl["bytes_down"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    ap.add_argument("--samples", type=int, default=500, help="Local training samples per client.")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "counting")
    a = ap.parse_args()
    rows = []
    for model in a.models.split(","):
        rows += count(model, a.samples, a.keep, a.prompts)
        print(f"{model}: counted", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    machine = machine_facts("bench/counting.py", sys.argv[1:])
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"One client's round, {a.samples} samples, keep {a.keep}, P = {a.prompts}, one pass; counted on meta "
             f"tensors. Command: `{machine['command']}`.", "",
             "| model | run | client GFLOPs | MB up | MB down | FLOPs / FL | bytes / FL | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(r["model"], {})
        claim = ""
        if r["variant"].startswith("paper"):
            claim = ", ".join(([f"{paper['flops']:.2%} FLOPs"] if "flops" in paper else []) +
                              ([f"{paper['bytes']}x bytes"] if "bytes" in paper else []))
        lines.append(f"| {r['model']} | {r['variant']} | {r['client_flops'] / 1e9:.1f} | {r['bytes_up'] / 1e6:.2f} | "
                     f"{r['bytes_down'] / 1e6:.2f} | {r['flops_vs_fl']:.4%} | {r['bytes_vs_fl']:.4f} | {claim} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
