#!/usr/bin/env bash
# GPU measurements prepared to run at once on a lent GPU machine (one H100 or H200, no network):
# every step is time-boxed, so one that fails or hangs does not eat the others' time, and the
# results are written after each step, so a call cut short still returns what was done.
#
# Teachers and data do not travel with the checkout (models/ is ignored, ../shared stays here).
# Pack them here, from the project root (float16 weights in 40 MB parts under .device-pack/), and
# for bench, the wheels of `datasets`, which SentenceTransformerTrainer needs and the GPU machine
# lacks (under 1 MiB, in the ignored .whl/):
#     ../shared/tools/device-pack.sh models/all-MiniLM-L6-v2 models/all-mpnet-base-v2
#     bash bench/gpu_wheels.sh
# then carry the parts one per device call, back to back (a machine is kept only ~30 s after a call):
#     command: mkdir -p /root/pack && cp .device-pack/pNN /root/pack/      carry: [".device-pack/pNN"]
# and in the call carrying the last part, with the wheels, run this script: it unpacks
# /root/pack/p* into $ROOT_W (once; PACK_DIR names another folder), installs .whl/*.whl where its
# Python finds them, and starts:
#     mkdir -p /root/pack && cp .device-pack/pNN /root/pack/ && bash bench/gpu_checks.sh bench
#                                                 carry: [".device-pack/pNN", ".whl"]
# The two teachers and ../shared/data make 8 parts (p00-p06 of 40 MiB, p07 of about 28 MiB): the
# last call carries p07 and .whl (0.9 MiB), about 34 MiB with the checkout, under a call's 64 MiB
# (a 40 MiB part and the wheels fit too). full and full-l3 do not need the wheels.
#
# Usage: [ROOT_W=/root/w] [OUT=DIR] bash bench/gpu_checks.sh MODE
#   bench    (planned ~6.5 min) device facts; training steps/s in bf16 at batch 256 (the student of
#            configs/default.yaml, heads-only and all-parameter stages, every input pipeline, with
#            the split of a step into data / forward / loss / backward / optimizer); mtd's trainer
#            (all loss terms, cos only) beside SentenceTransformerTrainer with MSELoss on the same
#            student, batch 256 and bf16, interleaved, with the ratio of their steps/s
#            (bench/peers.py --throughput-only; skipped, naming the fix, without the wheels); the
#            exact resim loss at batch 256 and 1024 (time, peak memory); target-cache fill beside
#            SentenceTransformer.encode for both teachers (20k texts, batch 256); FSDP on one GPU
#            through accelerate launch (20 steps a stage, export); the all-parameter stage with cos
#            alone. BENCH_SECONDS (default 500) bounds the whole; steps that no longer fit are skipped.
#   full     python train.py configs/full.yaml on $ROOT_W's teachers, corpora and STS sets, the
#            target caches filled first (python -m mtd.cache). Stops after FULL_SECONDS (default
#            520), then collects: under 10 minutes in all. Run it again at once (same machine,
#            within its warm window) to --resume from the last checkpoint (train.save_every=250).
#            The run stays in $ROOT_W/runs/NAME.
#   full-l3  the same with the 3-layer student: name=full-l3 "student.layers=[0,3,5]".
#   smoke    every step of bench and of full at toy size on the CPU, with this checkout's models/
#            and ../shared/data (ROOT_W defaults to a temporary folder of links to them), faiss,
#            pytrec_eval, open_clip and model2vec hidden as on the GPU machine: tests this script.
# Results (at most 8 files, what a call to the GPU machine returns): $OUT/summary-MODE.json
# (each step's status, seconds and results), $OUT/MODE-files.tar.gz (each step's log and JSON),
# and for full modes the student's final/ in float16 as $OUT/MODE-student.tar.NN (FULL_STUDENT=0: not); here:
#     cat MODE-student.tar.* | tar x    ->  student-fp16/, a sentence-transformers folder
# OUT defaults to $OUT, else bench/results/gpu (smoke: ${TMPDIR:-/tmp}/mtd-gpu-smoke).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${1:-}
case "$MODE" in
  bench|full|full-l3|smoke) ;;
  *) echo "usage: bash bench/gpu_checks.sh bench|full|full-l3|smoke   (see the header of this file)" >&2
     exit 2 ;;
esac
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # this checkout's mtd (not installed there)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtd-gpu-checks.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RES=$WORK/$MODE
mkdir -p "$RES"

if [ "$MODE" = smoke ]; then
  DEVICE=cpu
  OUT=${OUT:-${TMPDIR:-/tmp}/mtd-gpu-smoke}
  if [ -z "${ROOT_W:-}" ]; then  # this checkout's teachers and ../shared/data, STS cut to 40 pairs
    ROOT_W=$WORK/w
    mkdir -p "$ROOT_W/shared/data"
    ln -s "$REPO/models" "$ROOT_W/models"
    ln -s "$(cd "$REPO/../shared/data/corpus" && pwd)" "$ROOT_W/shared/data/corpus"
    for f in "$REPO"/../shared/data/sts/*/test.jsonl; do
      d=$ROOT_W/shared/data/sts/$(basename "$(dirname "$f")")
      mkdir -p "$d" && head -n 40 "$f" > "$d/test.jsonl"
    done
  fi
  # Hide what the GPU machine lacks, for this script's processes and their children (not
  # `datasets`, which it lacks too: sentence-transformers here is newer and imports it at the top).
  mkdir -p "$WORK/hide"
  cat > "$WORK/hide/sitecustomize.py" <<'PY'
import importlib.machinery
import sys

HIDDEN = {"faiss", "pytrec_eval", "open_clip", "model2vec"}


class _Hiding(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_Hiding if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
PY
  export PYTHONPATH=$WORK/hide${PYTHONPATH:+:$PYTHONPATH}
else
  DEVICE=cuda
  ROOT_W=${ROOT_W:-/root/w}
  OUT=${OUT:-bench/results/gpu}
  PACK_DIR=${PACK_DIR:-/root/pack}
  if [ ! -d "$ROOT_W/models" ] && compgen -G "$PACK_DIR/p[0-9]*" > /dev/null; then
    echo "unpacking $PACK_DIR/p* into $ROOT_W"
    mkdir -p "$ROOT_W" && cat "$PACK_DIR"/p[0-9]* | tar x -C "$ROOT_W"
  fi
fi
if [ -d "$ROOT_W" ]; then ROOT_W=$(cd "$ROOT_W" && pwd); fi
MINILM=$ROOT_W/models/all-MiniLM-L6-v2
MPNET=$ROOT_W/models/all-mpnet-base-v2
declare -A TEACHER=([minilm]=$MINILM [mpnet]=$MPNET)
CORPUS=$ROOT_W/shared/data/corpus
for need in "$MINILM" "$MPNET" "$CORPUS" "$ROOT_W/shared/data/sts"; do
  if [ ! -d "$need" ]; then
    echo "missing $need: carry the device-pack parts to ${PACK_DIR:-/root/pack} (see the header of" \
         "bench/gpu_checks.sh), or set ROOT_W to the folder holding models/ and shared/data/" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/summary-$MODE.json" "$OUT/$MODE-files.tar.gz" "$OUT/$MODE"-student.tar.*

case "$MODE" in
  bench) BUDGET=${BENCH_SECONDS:-500} ;;
  full|full-l3) BUDGET=${FULL_SECONDS:-520} ;;
  smoke) BUDGET=${SMOKE_SECONDS:-1200} ;;
esac
RESERVE=20  # seconds kept for collecting the results after the last step (full: the student)
case "$MODE" in full|full-l3|smoke) RESERVE=60 ;; esac
DEADLINE=$((SECONDS + BUDGET))
q() { "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }  # YAML-safe quoting

summarize() {
  "$PY" - "$RES" "$OUT/summary-$MODE.json" "$MODE" "$ROOT_W" <<'PY'
import json
import sys
import time
from pathlib import Path

res, out, mode, root_w = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = []
for line in (res / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, result = line.split("\t")
    row = {"name": name, "status": status, "rc": int(rc), "seconds": int(seconds)}
    for f in [p for p in result.split(",") if p]:
        try:
            row.setdefault("results", {})[f] = json.loads((res / f).read_text())
        except (OSError, ValueError) as e:
            row.setdefault("results", {})[f] = f"not readable: {e}"
    log = res / f"{name}.log"
    if status != "pass" and log.is_file():
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    steps.append(row)
summary = {"mode": mode, "root_w": root_w, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "passed": [s["name"] for s in steps if s["status"] == "pass"],
           "failed": [s["name"] for s in steps if s["status"] not in ("pass", "skipped")],
           "skipped": [s["name"] for s in steps if s["status"] == "skipped"], "steps": steps}
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(summary, indent=1) + "\n")
tmp.replace(out)
PY
  tar czf "$OUT/$MODE-files.tar.gz.tmp" -C "$WORK" "$MODE"
  mv -f "$OUT/$MODE-files.tar.gz.tmp" "$OUT/$MODE-files.tar.gz"
}

# step NAME LIMIT RESULTS CMD...: run CMD (stdin passed on) for at most LIMIT seconds (less if the
# budget is short; skipped under 20 s), its output in RESULTS_DIR/NAME.log; RESULTS: the JSON files
# it writes there, comma-separated, inlined in the summary.
step() {
  local name=$1 limit=$2 results=$3 rc=0 status t0=$SECONDS
  shift 3
  local left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt 20 ]; then
    skipped "$name" "${left}s of the budget left"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" > "$RES/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $((SECONDS - t0)) "$results" >> "$RES/steps.tsv"
  summarize
  echo "   $status (rc $rc, $((SECONDS - t0)) s)"
  [ "$status" = pass ] || tail -n 5 "$RES/$name.log" | sed 's/^/   | /'
}

# skipped NAME WHY: NAME recorded as skipped, WHY at the end of its log (so in the summary).
skipped() {
  echo "== $1: skipped ($2)"
  echo "skipped: $2" >> "$RES/$1.log"
  printf '%s\tskipped\t0\t0\t\n' "$1" >> "$RES/steps.tsv"
  summarize
}

facts() {
  step facts 60 facts.json "$PY" - "$RES/facts.json" <<'PY'
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import mtd  # noqa: F401  (torchvision shim before transformers loads)
import accelerate
import sentence_transformers
import torch
import transformers

smi = None
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
cuda = torch.cuda.is_available()
facts = {
    "nvidia_smi": smi, "cuda_available": cuda, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name() if cuda else None,
    "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
    "python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
    "transformers": transformers.__version__, "accelerate": accelerate.__version__,
    "sentence_transformers": sentence_transformers.__version__,
}
for name in ("datasets", "pyarrow", "pandas", "fsspec", "huggingface_hub", "dill", "multiprocess", "xxhash"):
    try:
        facts[name] = version(name)
    except PackageNotFoundError:
        facts[name] = None
print(json.dumps(facts, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(facts, f, indent=1)
PY
}

# configs/default.yaml with its teachers and student on $ROOT_W, as is and with cos alone.
bench_configs() {
  "$PY" - "$MINILM" "$MPNET" "$WORK" <<'PY'
import json
import sys
from pathlib import Path

from mtd.config import dump_config, load_config

minilm, mpnet, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
paths = [f"teachers.0.path={json.dumps(minilm)}", f"teachers.1.path={json.dumps(mpnet)}",
         f"student.path={json.dumps(minilm)}"]
(work / "default.yaml").write_text(dump_config(load_config("configs/default.yaml", paths)))
cos = [f"stages.{i}.heads={{fc1: [cos]}}" for i in range(3)]
(work / "default-cos.yaml").write_text(dump_config(load_config("configs/default.yaml", paths + cos)))
PY
}

# mtd's trainer beside SentenceTransformerTrainer (bench/peers.py --throughput-only ARGS...) on the
# default config's student. That trainer needs `datasets`: where the Python cannot import it, the
# wheels carried in .whl/ (bash bench/gpu_wheels.sh) are installed first, and without them the step
# is skipped, naming the fix.
st_throughput() {
  if ! "$PY" -c 'import datasets' > /dev/null 2>&1 && compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    step wheels 120 "" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$WORK/site" "$REPO"/.whl/*.whl
    export PYTHONPATH=$WORK/site:$PYTHONPATH
  fi
  if ! "$PY" -c 'import datasets' > "$RES/throughput-st.log" 2>&1; then
    skipped throughput-st "SentenceTransformerTrainer needs datasets, which does not import here (above). Run
bash bench/gpu_wheels.sh in the project root where pip works, and carry .whl with this call (see
the header of bench/gpu_checks.sh)"
    return 0
  fi
  step throughput-st "$1" throughput_st.json "$PY" bench/peers.py --throughput-only \
    --config "$WORK/default.yaml" "${@:2}" --out "$RES/throughput_st.json"
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# FSDP (configs/accelerate/fsdp.yaml) in one process: a few steps a stage, a mid-stage checkpoint
# (which must hold FSDP's shards) and the export. On CPU through tests/fsdp_on_cpu.py (Accelerate
# selects FSDP only on GPUs; see that file).
fsdp() {
  local steps=$1 texts=$2 precision=$3 limit=$4 script=train.py name=fsdp-1gpu
  local -a env_cpu=()
  if [ "$DEVICE" = cpu ]; then script=tests/fsdp_on_cpu.py; env_cpu=(env ACCELERATE_USE_CPU=1); fi
  local -a args=(configs/default.yaml "name=$name" "output_dir=$(q "$WORK/runs")"
                 "cache_dir=$(q "$ROOT_W/cache")" "teachers.0.path=$(q "$MINILM")"
                 "teachers.1.path=$(q "$MPNET")" "student.path=$(q "$MINILM")"
                 "data.max_texts=$texts" data.dev_size=50 train.eval_every=0 train.log_every=5
                 "train.save_every=$((steps / 2))" "train.mixed_precision=$precision" eval.sts_dir=null)
  for i in 0 1 2; do args+=("stages.$i.steps=$steps"); done
  step fsdp "$limit" "" "${env_cpu[@]}" "$PY" -m accelerate.commands.launch \
    --config_file configs/accelerate/fsdp.yaml --num_processes 1 --num_machines 1 \
    --main_process_port "$(free_port)" "$script" "${args[@]}"
  step fsdp-check 60 fsdp.json "$PY" - "$WORK/runs/$name" "$RES/fsdp.json" <<'PY'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
shards = sorted(str(p.relative_to(run)) for p in run.glob("checkpoints/*/pytorch_model_fsdp_*"))
final = run / "final" / "model.safetensors"
found = {"fsdp_shard_folders": shards, "exported": final.is_file(),
         "log_rows": sum(1 for _ in (run / "log.jsonl").open()) if (run / "log.jsonl").is_file() else 0}
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
print(found)
sys.exit(0 if shards and final.is_file() else 1)
PY
}

# full / full-l3 (and their toy version in smoke): fill the caches, train (resuming when the run
# has checkpoints), collect results, log and the student in float16.
full_run() {
  local name=$1
  shift
  local corpus
  corpus=$(printf '%s,' "$(q "$CORPUS/wikipedia_sentences.txt")" "$(q "$CORPUS/wordnet_glosses.txt")" \
           "$(q "$CORPUS/wordnet_examples.txt")" "$(q "$CORPUS/coco_captions.txt")")
  local -a args=(configs/full.yaml "name=$name" "output_dir=$(q "$ROOT_W/runs")"
                 "cache_dir=$(q "$ROOT_W/cache")" "teachers.0.path=$(q "$MINILM")"
                 "teachers.1.path=$(q "$MPNET")" "student.path=$(q "$MINILM")"
                 "data.corpus=[${corpus%,}]" "eval.sts_dir=$(q "$ROOT_W/shared/data/sts")"
                 train.save_every=250 "$@")
  local run=$ROOT_W/runs/$name
  if [ "$MODE" = smoke ]; then rm -rf "$run"; fi
  local -a resume=()
  if [ -d "$run/checkpoints" ] && [ -n "$(ls -A "$run/checkpoints")" ]; then resume=(--resume); fi
  step "$name-cache" 300 "" "$PY" -m mtd.cache "${args[@]}"
  step "$name-train" "$BUDGET" "" "$PY" train.py "${args[@]}" "${resume[@]}"
  DEADLINE=$((DEADLINE + RESERVE))  # the reserve is for what follows
  for f in results.json log.jsonl config.yaml; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$RES/$name-$f"; fi
  done
  step "$name-collect" 60 "$name-progress.json" "$PY" - "$run" "$RES/$name-progress.json" <<'PY'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
log, results, checkpoints = run / "log.jsonl", run / "results.json", run / "checkpoints"
rows = [json.loads(line) for line in log.open()] if log.is_file() else []
progress = {"finished": results.is_file(), "log_rows": len(rows), "last_log_row": rows[-1] if rows else None,
            "checkpoints": sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else [],
            "results": json.loads(results.read_text()) if results.is_file() else None}
Path(sys.argv[2]).write_text(json.dumps(progress, indent=1))
print(json.dumps(progress, indent=1)[:3000])
sys.exit(0 if progress["finished"] else 1)
PY
  if [ "${FULL_STUDENT:-1}" = 1 ] && [ -f "$run/final/model.safetensors" ]; then
    step "$name-student" 60 "" "$PY" - "$run/final" "$WORK/student-fp16" <<'PY'
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
for f in dst.rglob("*.safetensors"):
    tensors = load_file(str(f))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(f),
              metadata={"format": "pt"})
PY
    tar cf - -C "$WORK" student-fp16 | split -b 15M -d - "$OUT/$MODE-student.tar."
    rm -rf "$WORK/student-fp16"
  fi
}

echo "mode $MODE, device $DEVICE, ROOT_W=$ROOT_W, OUT=$OUT, budget ${BUDGET}s"
: > "$RES/steps.tsv"
facts
if [ "$DEVICE" = cuda ] && ! grep -q '"cuda_available": true' "$RES/facts.json" 2> /dev/null; then
  echo "no CUDA device found (facts in $OUT/summary-$MODE.json): $MODE needs the GPU machine;" \
       "bash bench/gpu_checks.sh smoke runs the same steps on a CPU" >&2
  exit 2
fi

case "$MODE" in
  bench)
    bench_configs
    step throughput 180 train_throughput.json "$PY" bench/train_throughput.py "$WORK/default.yaml" \
      --device cuda --precision bf16 --batch 256 --steps 20 --warmup 3 --repeats 2 --texts 10000 \
      --out "$RES/train_throughput.json"
    st_throughput 150 --device cuda --precision bf16 --batch 256 --throughput-steps 50 --repeats 2 \
      --max-texts 10000 --threads "$(nproc)"
    step resim 60 resim_speed.json "$PY" bench/resim_speed.py --device cuda --sizes 256,1024 \
      --repeats 5 --max-seconds 20 --out "$RES/resim_speed.json"
    for t in minilm mpnet; do
      step "cache-$t" 75 "cache_$t.json" "$PY" bench/cache_speed.py --device cuda --teacher "${TEACHER[$t]}" \
        --corpus "$CORPUS/wikipedia_sentences.txt" --texts 20000 --batch-size 256 --repeats 2 \
        --out "$RES/cache_$t.json"
    done
    fsdp 20 4000 bf16 120
    step throughput-cos 100 train_throughput_cos.json "$PY" bench/train_throughput.py \
      "$WORK/default-cos.yaml" --stages all --device cuda --precision bf16 --batch 256 --steps 20 \
      --warmup 3 --repeats 2 --texts 10000 --out "$RES/train_throughput_cos.json"
    ;;
  full) full_run full ;;
  full-l3) full_run full-l3 "student.layers=[0,3,5]" ;;
  smoke)
    bench_configs
    tiny=(--device cpu --precision no --batch 8 --steps 1 --warmup 1 --repeats 1 --texts 48 --threads 1)
    step throughput 300 train_throughput.json "$PY" bench/train_throughput.py "$WORK/default.yaml" \
      "${tiny[@]}" --out "$RES/train_throughput.json"
    st_throughput 300 --device cpu --precision no --batch 8 --throughput-steps 2 --repeats 1 \
      --max-texts 48 --threads 1
    step resim 120 resim_speed.json "$PY" bench/resim_speed.py --device cpu --sizes 16,32 --repeats 1 \
      --threads 1 --out "$RES/resim_speed.json"
    for t in minilm mpnet; do
      step "cache-$t" 180 "cache_$t.json" "$PY" bench/cache_speed.py --device cpu --teacher "${TEACHER[$t]}" \
        --corpus "$CORPUS/wikipedia_sentences.txt" --texts 32 --batch-size 16 --repeats 1 --threads 1 \
        --out "$RES/cache_$t.json"
    done
    fsdp 2 200 no 300
    step throughput-cos 300 train_throughput_cos.json "$PY" bench/train_throughput.py \
      "$WORK/default-cos.yaml" --stages all "${tiny[@]}" --out "$RES/train_throughput_cos.json"
    toy=(data.max_texts=300 data.dev_size=20 train.mixed_precision=no train.num_workers=0
         train.log_every=1 eval.batch_size=16)
    for i in 0 1 2; do toy+=("stages.$i.epochs=null" "stages.$i.steps=2" "stages.$i.batch_size=16"); done
    full_run full-smoke "${toy[@]}"
    ;;
esac

summarize
"$PY" - "$OUT/summary-$MODE.json" <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
print(f"\n{s['mode']}: passed {s['passed']}\nfailed {s['failed']}\nskipped {s['skipped']}\n-> {sys.argv[1]}")
sys.exit(1 if s["failed"] or s["skipped"] else 0)
PY
