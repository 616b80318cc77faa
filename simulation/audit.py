"""The inversion audit: how well an honest-but-curious server rebuilds a device's images from the smashed tokens,
per split (head blocks k), wire precision and defence, by each attack in `simulation/inversion.py`.

The images attacked are the first `images` of the devices' task's test split (never seen in training); the server
trains its learned inverse on public images of the same kind (`public`). Reconstructions are scored in pixel space
([0, 1], the preprocessing undone) by PSNR and SSIM (scikit-image) against the originals. Each setting writes its
row (`rows/<setting>.json`, so a run resumes) and a PNG grid, originals above each attack's reconstructions;
`results.md` and `results.json` gather them, `audit.png` plots PSNR per split.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from export.backbone import create_vit, preprocessing_of, resolve_model
from export.split import SplitViT
from sfp_common.datasets import load_dataset
from sfp_common.errors import ConfigError
from sfp_common.preprocess import Preprocessing, preprocess
from sfp_common.split_spec import SplitSpec
from simulation.inversion import analytic_inverse, on_the_wire, optimised_inverse, train_learned_inverse
from simulation.methods import defended
from wire_protocol.codec import FLOAT_WIRES, encoded_bytes

ATTACKS = ("analytic", "optimised", "learned")
# What we call a failed reconstruction (issue 15): both must hold.
FAILS_BELOW_PSNR, FAILS_BELOW_SSIM = 15.0, 0.3


@dataclass(frozen=True)
class AuditConfig:
    model: str = "models/vit-fmnist.pth"
    dataset: str = "mnist5k"            # the devices' task: its test images are attacked
    public: str = "fashion-mnist"       # the server's own images of the same kind, for the learned inverse
    images: int = 16
    public_images: int = 10000
    head_blocks: tuple[int, ...] = (0, 1, 2)
    wires: tuple[str, ...] = ("fp32", "fp16", "int8")
    noise: tuple[float, ...] = (0.0,)   # defence: the recipe's token_noise (sfp_common/defence.py)
    prompts: int = 10
    steps: int = 300                    # the optimised inverse: Adam steps per restart
    restarts: int = 3
    inverse_epochs: int = 5             # the learned inverse's training epochs
    seed: int = 0
    checkpoint: str | None = None       # a server's checkpoint.npz: its current prompts (default: the initial)

    def check(self) -> None:
        unknown = set(self.wires) - set(FLOAT_WIRES)
        if unknown:
            raise ConfigError(f"unknown wire {sorted(unknown)}; choose from {', '.join(FLOAT_WIRES)}")
        if self.images < 1 or self.public_images < 1 or min(self.head_blocks, default=0) < 0:
            raise ConfigError("images and public images must be >= 1 and head blocks >= 0")
        if any(not 0 <= n < float("inf") for n in self.noise):
            raise ConfigError(f"noise scales must be >= 0, got {self.noise}")


def to_pixels(x: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """Model input back to [0, 1] pixels, [B, H, W, C]."""
    mean = torch.tensor(prep.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(prep.std).reshape(1, -1, 1, 1)
    return (x.detach() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def image_scores(original: np.ndarray, rebuilt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSNR (dB) and SSIM per image, pixels in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    psnr = np.array([peak_signal_noise_ratio(o, r, data_range=1.0) for o, r in zip(original, rebuilt)])
    ssim = np.array([structural_similarity(o, r, data_range=1.0, channel_axis=-1) for o, r in zip(original, rebuilt)])
    return np.minimum(psnr, 100.0), ssim          # an exact copy has infinite PSNR: shown as 100 dB


def setting_name(k: int, wire: str, noise: float) -> str:
    return f"k{k}-{wire}-noise{noise:g}"


class Audit:
    """One audit: the model and images loaded once, then each setting attacked in turn."""

    def __init__(self, cfg: AuditConfig, progress: Callable[[str], None] = print) -> None:
        cfg.check()
        self.cfg, self.progress = cfg, progress
        torch.manual_seed(cfg.seed)
        data = load_dataset(cfg.dataset)
        self.source = resolve_model(cfg.model)
        self.vit = create_vit(self.source, num_classes=len(data.classes), pretrained=True)
        self.prep = preprocessing_of(self.vit)
        self.images = torch.from_numpy(preprocess(data.test.images[:cfg.images], self.prep))
        public = load_dataset(cfg.public).train
        self.public = torch.from_numpy(preprocess(public.images[:cfg.public_images], self.prep))
        self.pixels = to_pixels(self.images, self.prep)
        channels = list(zip(self.prep.mean, self.prep.std))        # the input range pixels in [0, 1] map to
        self.bounds = (min(-m / s for m, s in channels), max((1 - m) / s for m, s in channels))
        # one cut model for every setting (the same prompts at every k, whatever order settings run or resume in)
        self.base = SplitViT(self.vit, SplitSpec(cfg.prompts, 0, 0)).eval()

    def model(self, k: int) -> SplitViT:
        if k > len(self.vit.blocks) - 1:
            raise ConfigError(f"{k} head blocks leave no body of the {len(self.vit.blocks)}-block model")
        model = self.base.recut(k).eval()
        if self.cfg.checkpoint:
            state = dict(np.load(self.cfg.checkpoint))
            if "head.prompts" not in state or state["head.prompts"].shape != tuple(model.head.prompts.shape):
                raise ConfigError(f"{self.cfg.checkpoint} holds no head.prompts of shape "
                                  f"{list(model.head.prompts.shape)}")
            with torch.no_grad():
                model.head.prompts.copy_(torch.from_numpy(state["head.prompts"]))
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def attack(self, k: int, wire: str, noise: float) -> tuple[dict, dict[str, np.ndarray]]:
        """One setting's row and each attack's reconstructed pixels."""
        cfg, model = self.cfg, self.model(k)
        rng = np.random.default_rng(cfg.seed)
        defend = lambda tokens: defended(model, noise, tokens, rng)                 # noqa: E731
        with torch.no_grad():
            tokens = on_the_wire(defend(model.head(self.images)), wire)
        rebuilt: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        for attack in ATTACKS:
            if attack == "analytic" and k > 0:
                continue
            start = time.time()
            if attack == "analytic":
                rebuilt[attack] = analytic_inverse(model, tokens)
            elif attack == "optimised":
                rebuilt[attack] = optimised_inverse(model, tokens, tuple(self.prep.input_size), self.bounds,
                                                    cfg.steps, cfg.restarts, seed=cfg.seed,
                                                    progress=lambda m: self.progress(f"  optimised: {m}"))
            else:
                inverse = train_learned_inverse(model, self.public, wire, cfg.inverse_epochs, seed=cfg.seed,
                                                transform=defend, progress=lambda m: self.progress(f"  learned: {m}"))
                with torch.no_grad():
                    rebuilt[attack] = inverse(tokens)
            seconds[attack] = round(time.time() - start, 1)
        pixels = {a: to_pixels(x, self.prep) for a, x in rebuilt.items()}
        attacks = {}
        for attack, rebuilt_pixels in pixels.items():
            psnr, ssim = image_scores(self.pixels, rebuilt_pixels)
            attacks[attack] = {"psnr": float(psnr.mean()), "psnr_sd": float(psnr.std(ddof=1)) if len(psnr) > 1
                               else 0.0, "ssim": float(ssim.mean()), "ssim_sd": float(ssim.std(ddof=1))
                               if len(ssim) > 1 else 0.0, "seconds": seconds[attack]}
        best = max(attacks, key=lambda a: attacks[a]["psnr"])
        row = {"setting": setting_name(k, wire, noise), "head_blocks": k, "wire": wire, "noise": noise,
               "token_bytes_per_image": encoded_bytes(tuple(tokens.shape[1:]), wire),
               "image_bytes": int(np.prod(self.prep.input_size)), "attacks": attacks, "best": best,
               "fails": all(a["psnr"] <= FAILS_BELOW_PSNR and a["ssim"] <= FAILS_BELOW_SSIM for a in attacks.values())}
        return row, pixels


def save_grid(path: Path, original: np.ndarray, rebuilt: dict[str, np.ndarray], title: str, scores: dict) -> None:
    """Originals in the top row, each attack's reconstructions below, labelled with their scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [("original", original)] + list(rebuilt.items())
    n = len(original)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.75 * n + 1.6, 0.8 * len(rows) + 0.5), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(images[i].squeeze(-1) if images.shape[-1] == 1 else images[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        label = name if name == "original" else (f"{name}\n{scores[name]['psnr']:.1f} dB\n"
                                                 f"SSIM {scores[name]['ssim']:.2f}")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(path: Path, rows: list[dict]) -> None:
    """The best attack's PSNR per split, one line per wire and noise, with the failure line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for wire, noise in dict.fromkeys((r["wire"], r["noise"]) for r in rows):
        line = sorted((r for r in rows if (r["wire"], r["noise"]) == (wire, noise)), key=lambda r: r["head_blocks"])
        ax.plot([r["head_blocks"] for r in line], [r["attacks"][r["best"]]["psnr"] for r in line], marker="o",
                label=f"{wire}" + (f", noise {noise:g}" if noise else ""))
    ax.axhline(FAILS_BELOW_PSNR, color="k", ls="--", lw=1, label=f"reconstruction fails ({FAILS_BELOW_PSNR:g} dB)")
    ax.set_xlabel("head blocks on the device (k)")
    ax.set_ylabel("best attack's PSNR (dB)")
    ax.set_ylim(0, 105)
    ax.set_xticks(sorted({r["head_blocks"] for r in rows}))
    ax.set_title("What the server rebuilds from the smashed tokens", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(rows: list[dict], cfg: AuditConfig) -> str:
    lines = [f"Inversion of {cfg.images} {cfg.dataset} test images from their smashed tokens by an honest-but-curious "
             f"server (backbone `{cfg.model}`, {cfg.prompts} prompts; learned inverse trained on {cfg.public_images} "
             f"{cfg.public} images). PSNR in dB and SSIM, mean ± sd over the images; 100 dB is an exact copy. "
             f"A reconstruction fails at PSNR <= {FAILS_BELOW_PSNR:g} dB and SSIM <= {FAILS_BELOW_SSIM:g}.", "",
             "| k | wire | noise | token bytes / image bytes | analytic | optimised | learned | every attack fails |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for attack in ATTACKS:
            a = r["attacks"].get(attack)
            cells.append("-" if a is None else f"{a['psnr']:.1f} ± {a['psnr_sd']:.1f} dB, SSIM {a['ssim']:.2f}")
        lines.append(f"| {r['head_blocks']} | {r['wire']} | {r['noise']:g} | "
                     f"{r['token_bytes_per_image']:,} / {r['image_bytes']:,} | {' | '.join(cells)} | "
                     f"{'yes' if r['fails'] else '**no**'} |")
    lines += ["", "![PSNR per split](audit.png)", ""]
    lines += [f"![{r['setting']}](grids/{r['setting']}.png)" for r in rows]
    return "\n".join(lines) + "\n"


def run_audit(cfg: AuditConfig, out: Path, progress: Callable[[str], None] = print,
              command: str | None = None) -> list[dict]:
    """Every setting (resumed from `out/rows/`), then the table, the grids and the plot; `command` is written
    down with the machine, beside those of earlier runs into the same folder."""
    out = Path(out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    audit: Audit | None = None
    rows = []
    settings = [(k, w, n) for k in cfg.head_blocks for w in cfg.wires for n in cfg.noise]
    for i, (k, wire, noise) in enumerate(settings, 1):
        name = setting_name(k, wire, noise)
        path = out / "rows" / f"{name}.json"
        if path.exists() and (out / "grids" / f"{name}.png").exists():
            rows.append(json.loads(path.read_text()))
            continue
        progress(f"[{i}/{len(settings)}] {name}")
        audit = audit or Audit(cfg, progress)
        row, pixels = audit.attack(k, wire, noise)
        save_grid(out / "grids" / f"{name}.png", audit.pixels, pixels, f"k = {k}, {wire} tokens"
                  + (f", noise {noise:g}" if noise else ""), row["attacks"])
        path.write_text(json.dumps(row, indent=1) + "\n")
        best = row["attacks"][row["best"]]
        progress(f"  best: {row['best']} {best['psnr']:.1f} dB, SSIM {best['ssim']:.2f}")
        rows.append(row)
    # the table covers every setting run into this folder (e.g. the noise defence in a second invocation)
    rows = sorted((json.loads(p.read_text()) for p in (out / "rows").glob("*.json")),
                  key=lambda r: (r["noise"] > 0, r["noise"], r["head_blocks"], FLOAT_WIRES.index(r["wire"])))
    plot_summary(out / "audit.png", rows)
    (out / "results.md").write_text(results_table(rows, cfg))
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    commands = [c for c in earlier.get("machine", {}).get("commands", []) if c != command] + [command] * bool(command)
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows, "machine": {
        "platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commands": commands}}, indent=1) + "\n")
    return rows
