#!/usr/bin/env bash
# The CPU experiment of experiments/configs/cpu_pretrained.py, one variant at a time:
#
#     bash experiments/run_cpu_pretrained.sh llama        # or llama-long, t5, t5-long
#
# Seed 1 runs every method of the registry; seeds 2 and 3 run SeqFT, OSF, GORP,
# O-LoRA and MTL. The runs land in runs/cpu_pretrained/<variant>-s<seed>-<method>
# (rerunning the script resumes an interrupted run and skips finished ones); their
# accuracy files, seed 1's plots, the comparison tables and each run's wall time are
# copied to experiments/results/cpu_pretrained/<variant>/, and the tables are made from
# those copies.
# Extra key=value arguments after the variant apply to every run (e.g. the base's path).
# COLLECT_ONLY=1 skips the runs and collects the finished ones; METHODS=a,b,... runs only
# those methods (in the script's order), SEEDS=1,2 only those seeds.
set -euo pipefail

variant=${1:?usage: run_cpu_pretrained.sh VARIANT [key=value ...]}
shift
config="experiments/configs/cpu_pretrained.py:${variant}"
runs="runs/cpu_pretrained"
results="experiments/results/cpu_pretrained/${variant}"
cljax="${CLJAX:-.venv/bin/cljax}"
# full fine-tuning first, the LoRA family last
all="seqft,osf,mtl,ewc,l2,replay,pertaskft,lwf,gorp,olora,seqlora,inclora,inflora"
seeded="seqft,osf,mtl,gorp,olora"
# the tables list the methods in the published T5-large ordering, then the others
table="seqft,seqlora,ewc,replay,inclora,olora,osf,gorp,mtl,l2,lwf,inflora,pertaskft"

mkdir -p "$results"
times="$results/wall_times.tsv"
[[ -f "$times" ]] || printf 'run\tseconds\n' >"$times"

finished() {  # finished RUN_DIR: every phase of the run is evaluated (its plots exist
    # from the first task on, so they cannot tell)
    python3 - "$1/accuracy.json" <<'PY'
import json, sys
try:
    record = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(1)
rows = record["accuracy"]
phases = 1 if record["method"] == "mtl" else len(record["tasks"])
sys.exit(0 if len(rows) == phases and None not in rows[-1] else 1)
PY
}

one() {  # one() SEED METHOD: a run, timed, unless its directory says it finished
    local seed=$1 method=$2 name="${variant}-s$1-$2"
    shift 2
    if finished "$runs/$name"; then
        return
    fi
    local start=$SECONDS
    "$cljax" run "$config" "data.seed=$seed" "train.seed=$seed" "method.name=$method" \
        "run.name=$name" "run.out_dir=$runs" run.progress=False "$@"
    printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$times"
}

chosen() {  # chosen SEED METHOD: SEEDS and METHODS are unset or name them
    [[ -z ${SEEDS:-} || ,$SEEDS, == *,$1,* ]] && [[ -z ${METHODS:-} || ,$METHODS, == *,$2,* ]]
}

if [[ -z ${COLLECT_ONLY:-} ]]; then
    for method in ${all//,/ }; do
        chosen 1 "$method" && one 1 "$method" "$@"
    done
    for seed in 2 3; do
        for method in ${seeded//,/ }; do
            chosen "$seed" "$method" && one "$seed" "$method" "$@"
        done
    done
fi

for dir in "$runs/${variant}"-s*; do
    finished "$dir" || continue
    name=$(basename "$dir")
    mkdir -p "$results/$name"
    cp "$dir"/accuracy.json "$dir"/accuracy.csv "$results/$name/"
    if [[ $name == *-s1-* ]]; then
        cp "$dir"/accuracy_matrix.png "$results/$name/"
    fi
done
# The tables are built from the collected copies, so runs collected on another machine
# (whose runs/ is gone) still count.
seed1=()
for method in ${table//,/ }; do
    if finished "$results/${variant}-s1-$method"; then
        seed1+=("$results/${variant}-s1-$method")
    fi
done
"$cljax" compare --plot "$results/compare.png" "${seed1[@]}" >"$results/seed1.md"
seeds=()
for method in ${table//,/ }; do
    for seed in 1 2 3; do
        if finished "$results/${variant}-s$seed-$method"; then
            seeds+=("$results/${variant}-s$seed-$method")
        fi
    done
done
"$cljax" compare --mean "${seeds[@]}" >"$results/mean.md"
cat "$results/seed1.md" "$results/mean.md"
