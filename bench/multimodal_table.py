"""The image path on coco_mini: stage-4 variants side by side (README "Images" table).

Each variant is `train.py configs/multimodal.yaml` with a few overrides, on the same text side
(runs/default: run `python train.py configs/default.yaml` first), the same 179 training images and
the same steps; each reports image-to-text and text-to-image Recall@1/5/10 on coco_mini test (60
images, 300 captions; chance R@5 about 8%) and its stage-4 loss curve. Results go to
bench/results/multimodal.json and a Markdown table on stdout.

    python bench/multimodal_table.py [--variants frozen,trained,...] [--prefix mm] [OVERRIDE ...]

Variants (all: efficientnet_lite0 tower, linear projection, self-distilled targets unless named):
    random     random-init tower, tower + projection trained (the floor)
    frozen     ImageNet tower frozen, projection + markers trained
    trained    ImageNet tower + projection + markers trained
    teacher    as `frozen`, targets from the teachers' caption vectors instead of the student's own
    pool       as `frozen`, Jasper's parameter-free pooling instead of the linear projection
    pool-trained  parameter-free pooling, tower + markers trained (the paper's stage 4)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ("stages.0.targets={fc1: teacher}", "stages.0.heads={fc1: [cos, sim, resim], fc256: [sim, resim]}")
VARIANTS = {
    "random": ("student.vision.pretrained=null", "stages.0.train=vision"),
    "frozen": ("stages.0.train=vision:projection,markers",),
    "trained": ("stages.0.train=vision",),
    "teacher": ("stages.0.train=vision:projection,markers", *TEACHER),
    "pool": ("stages.0.train=vision:projection,markers", "student.vision.projection=pool"),
    "pool-trained": ("stages.0.train=vision", "student.vision.projection=pool"),
}


def run_variant(name: str, prefix: str, extra: list[str]) -> dict:
    run = f"{prefix}-{name}"
    cmd = [sys.executable, "train.py", "configs/multimodal.yaml", f"name={run}", *VARIANTS[name], *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.perf_counter() - t0
    run_dir = ROOT / "runs" / run
    results = json.loads((run_dir / "results.json").read_text())
    recall = next(r for r in results if r.get("task") == "image-text")
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    curve = [(r["step"], round(r["loss"], 4)) for r in log if "loss" in r]
    return {"variant": name, "run": run, "overrides": [*VARIANTS[name], *extra], "seconds": seconds,
            "recall": {k: v for k, v in recall.items() if "@" in k}, "loss_curve": curve}


def table(rows: list[dict]) -> str:
    keys = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    lines = ["| variant | " + " | ".join(keys) + " | train.py minutes |", "|---|" + "---:|" * (len(keys) + 1)]
    for r in rows:
        cells = [f"{r['recall'][k]:.1f}" for k in keys] + [f"{r['seconds'] / 60:.1f}"]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prefix", default="mm")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multimodal.json",
                        help="results JSON; rows of variants not run this time are kept")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every variant")
    args = parser.parse_args()
    rows = [run_variant(v, args.prefix, args.overrides) for v in args.variants.split(",")]
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    rows = [r for r in old if r["variant"] not in {x["variant"] for x in rows}] + rows
    rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    for r in rows:
        print(f"{r['variant']} loss: " + " ".join(f"{s}:{v}" for s, v in r["loss_curve"]))


if __name__ == "__main__":
    main()
