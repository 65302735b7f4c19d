#!/usr/bin/env bash
# The H100 sweep in one command, for the lent GPU machine. Ready it here with
#   scripts/h100_prepare.sh      # the binaries and the GPU test binaries, into .device/
# then, through the device tool's run with carry [".device"]:
#   bash .device/gpu.sh bash scripts/h100.sh $OUT [VARIANT ...]
# A VARIANT is NAME=VALUE[,NAME=VALUE...], settings of the kernel switches the GPU code reads
# (BENCHMARKS.md lists them), e.g. GPUNORM_SUBGROUPS=0 or GPUNORM_BN_ROWS=0,GPUNORM_BN_TILES=8192.
# Writes into OUTDIR (at most 8 files come back from the device tool):
#   bench.txt, bench.json, bench.svg  the sweep with the defaults on the GPU, all shapes in one
#                                     process, the small-batch cost, and the training ops
#   torch.txt                         PyTorch on the same card, in f32 and f16, for same-run ratios
#   tests.txt                         the GPU tests, with GPUNORM_REQUIRE_GPU=1
#   variants.txt                      GPU kernel times (of $VOPS, default LayerNorm, BatchNorm
#                                     training and eval, and LayerNorm's backward) of the
#                                     defaults and of each variant, each
#                                     shape in a process of its own (a process that has run other
#                                     big shapes first measures slower; see BENCHMARKS.md), the
#                                     defaults first and last
#   clocks.csv                        the card's clocks, power and throttle reasons every 0.5 s
# Every step has a time limit, so one that hangs costs only its own share of the device minutes.
# The limits add up past the 600 s one device call may run: STEPS picks parts, comma-separated,
# from sweep, training, half, torch, tests, variants (default all), e.g. STEPS=half,torch takes
# at most 300 s.
set -u
out=${1:?usage: scripts/h100.sh OUTDIR [NAME=VALUE[,NAME=VALUE...] ...]}
shift
dev=.device
shapes=${SHAPES:-4096x768,65536x1024,16384x4096,2048x32768,262144x1024}
# Variants skip the 1 GiB shape: its uploads take most of a run's time.
vshapes=${VSHAPES:-4096x768,65536x1024,16384x4096,2048x32768}
vops=${VOPS:-layer_norm,batch_norm_train,batch_norm_eval,layer_norm_backward}
mkdir -p "$out"
want() { # want PART: whether STEPS asks for PART.
    [ "${STEPS:-all}" = all ] || [[ ",$STEPS," == *",$1,"* ]]
}
step() { # step SECONDS LOG CMD...: runs CMD under a limit, output to LOG and, briefly, here.
    local limit=$1 log=$2
    shift 2
    echo "== $(date -u +%T) $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== exit $? after ${SECONDS}s in all" | tee -a "$log"
}
nvidia-smi --query-gpu=timestamp,pstate,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 500 >"$out/clocks.csv" 2>&1 &
monitor=$!
step 30 "$out/bench.txt" "$dev/gpunorm" info
want sweep && step 200 "$out/bench.txt" "$dev/gpunorm" bench ${GPU_ONLY:+--gpu-only} \
    --shapes "$shapes" --small-batch --json "$out/bench.json" --plot "$out/bench.svg"
# The training ops (issue 10): the backward passes into a reused dx report kernel time, the
# allocating forms and the fused add end to end only.
want training && step 150 "$out/bench.txt" "$dev/gpunorm" bench --gpu-only --reps 3 \
    --shapes "$vshapes" \
    --ops rms_norm,layer_norm_backward,layer_norm_backward_alloc,rms_norm_backward,add_layer_norm,batch_norm_backward,batch_norm_backward_alloc,layer_norm_step,layer_norm_step_saved
# Half precision (issue 11): f16 row ops, kernel time against the same run's copy of the
# same bytes, and bf16 LayerNorm and RMSNorm.
if want half; then
    step 120 "$out/bench.txt" "$dev/gpunorm" bench --gpu-only --dtype f16 --shapes "$vshapes" \
        --ops layer_norm,rms_norm,layer_norm_backward,add_layer_norm
    step 60 "$out/bench.txt" "$dev/gpunorm" bench --gpu-only --dtype bf16 --shapes "$vshapes" \
        --ops layer_norm,rms_norm
fi
if want torch; then
    # The decode-shaped rows of --small-batch too: PyTorch's time for them is its launch cost.
    step 60 "$out/torch.txt" python3 "$dev/torch_anchor.py" ${shapes//,/ } 1x4096 8x4096
    step 60 "$out/torch.txt" python3 "$dev/torch_half_anchor.py" ${vshapes//,/ }
fi
if want tests; then
    gunzip -f "$dev"/tests/*.gz 2>/dev/null
    for t in "$dev"/tests/*; do
        chmod +x "$t" && step 45 "$out/tests.txt" env GPUNORM_REQUIRE_GPU=1 "$t" --test-threads 4
    done
fi
if want variants; then
    for variant in default "$@" default; do
        settings=()
        [ "$variant" = default ] || IFS=, read -ra settings <<<"$variant"
        for s in ${vshapes//,/ }; do
            step 30 "$out/variants.txt" env "${settings[@]}" "$dev/gpunorm" bench --gpu-only \
                --reps 5 --ops "$vops" --shapes "$s"
        done
    done
fi
kill "$monitor"
want tests && grep -h "test result\|panicked" "$out/tests.txt"
