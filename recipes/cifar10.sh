#!/usr/bin/env bash
# The CIFAR-10 recipe of docs/cifar10.md: train one method, then evaluate it.
#
#   bash recipes/cifar10.sh METHOD DATA OUT
#
#   METHOD  dino | simdino | dinov2 | simdinov2
#   DATA    an ImageFolder tree with train/ and test/ (python recipes/cifar10_to_jpeg.py ROOT data/cifar10 writes it),
#           or cifar10:ROOT for torchvision's CIFAR-10 files (downloaded into ROOT on first use)
#   OUT     the run's folder: log.jsonl, one checkpoint per epoch, the evaluations' JSON files
#
# Every method sees the same images: vit_tiny/8, batch 64, EPOCHS x EPOCH_LENGTH iterations
# (4 x 250 = 1,000 iterations, 64,000 images, 1.28 passes over the train split).
# Then, on the test split: k-NN of the last checkpoint and of the same network at initialisation
# (--compare_init), a linear probe of the last checkpoint, and k-NN of the earlier epochs'
# checkpoints (the figure's curve; CURVE_EPOCHS="4 8" evaluates those epochs' checkpoints only, default all).
# STAGES selects what runs (default "train knn linear knn_curve"); EPOCH_LENGTH, EPOCHS, LINEAR_EPOCHS and
# NUM_WORKERS shrink or grow the run (the CI test runs this file on a few hundred fake images); SEED (default 0,
# the documented runs) changes the initialisation, the data order, the crops and the drop-path draws, to measure
# run-to-run noise. EXTRA (default empty) holds flags appended to the training command after the method's own, so
# they override both: EXTRA="--momentum_teacher 0 --final_momentum_teacher 0" trains without self-distillation
# (the teacher is the student after every step, the paper's Table 9; docs/ablations.md).
set -euo pipefail
method=$1; data=$2; out=$3
EPOCH_LENGTH=${EPOCH_LENGTH:-250}
EPOCHS=${EPOCHS:-4}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-1}
NUM_WORKERS=${NUM_WORKERS:-1}
SEED=${SEED:-0}
STAGES=${STAGES:-train knn linear knn_curve}
CURVE_EPOCHS=${CURVE_EPOCHS:-}
read -r -a extra <<< "${EXTRA:-}"   # split on spaces; empty: no flags
PYTHON=${PYTHON:-python}
run() { echo "+ $*"; "$@"; }   # each command into the log, then run it

# what all four share (docs/cifar10.md explains each change from the ImageNet recipe)
common=(--arch vit_tiny --patch_size 8 --drop_path_rate 0.1
        --global_crops_size 32 --global_crops_scale 0.25 1
        --local_crops_size 16 --local_crops_scale 0.05 0.25 --local_crops_number 4
        --batch_size_per_gpu 64 --epochs "$EPOCHS" --epoch_length "$EPOCH_LENGTH" --warmup_epochs 1
        --lr 0.002 --momentum_teacher 0.95 --seed "$SEED" --saveckp_freq 1 --num_workers "$NUM_WORKERS")
floor=()   # the --compare_init network's flags beyond the run's own (DINOv2's below)
case $method in
  # DINO and DINOv2: 4,096 prototypes instead of 65,536; the teacher temperature stays at 0.04, where
  # their schedules start (0.04 -> 0.07 over 30 epochs, longer than this whole run). With a one-epoch
  # warm-up, DINO's per-epoch schedule switches to 0.07 at iteration 250, and DINO collapsed to the
  # uniform distribution right after (docs/ablations.md)
  # DINO alone at its own teacher momentum, 0.996: at the others' 0.95 its teacher swung between near
  # one-hot and near uniform, then collapsed to uniform. Its own lr, 0.0005 per 256 images, did 0.7 points
  # better than the others' 0.002 at 0.996; neither learned much in this budget (docs/cifar10.md, "Every run made")
  dino)      own=(--out_dim 4096 --teacher_temp 0.04 --warmup_teacher_temp_epochs 0 --lr 0.0005 --momentum_teacher 0.996) ;;
  # DINOv2's floor is its network at layerscale 0.1, not its own 1e-5: at 1e-5 every image gets nearly the same
  # feature and the floor is float32 rounding, near chance (eval_knn.py --help)
  dinov2)    own=(--out_dim 4096 --ibot_out_dim 4096 --teacher_temp 0.04 --warmup_teacher_temp_epochs 0)
             floor=(--init_layerscale 0.1) ;;
  # SimDINO: the coding-rate weight the paper's own batch gave, not this run's batch of 64. SimDINOv2: twice
  # the paper's 0.0049, Algorithm 2's balance of its two distance terms against R_eps (docs/cifar10.md)
  simdino)   own=(--gamma 0.00586) ;;
  simdinov2) own=(--gamma 0.0098) ;;
  *) echo "usage: bash recipes/cifar10.sh dino|simdino|dinov2|simdinov2 DATA OUT" >&2; exit 2 ;;
esac
last=$(printf "%s/checkpoint%04d.pth" "$out" "$EPOCHS")
evaluation=(--data "$data" --resize_size 32 --crop_size 32 --num_workers "$NUM_WORKERS")
# checked before the training starts, not after it
curve=()
for epoch in $CURVE_EPOCHS; do
  if [[ $epoch =~ ^[0-9]+$ ]]; then n=$((10#$epoch)); else n=0; fi   # 10#: "04" is 4, not octal
  if [ "$n" -lt 1 ] || [ "$n" -ge "$EPOCHS" ]; then
    echo "error: CURVE_EPOCHS holds '$epoch': give epochs from 1 to EPOCHS - 1 = $((EPOCHS - 1))" >&2; exit 2
  fi
  curve+=("$(printf "%s/checkpoint%04d.pth" "$out" "$n")")
done

for stage in $STAGES; do
  case $stage in
    train)
      run $PYTHON "$method.py" "${common[@]}" "${own[@]}" ${extra[@]+"${extra[@]}"} \
        --data "$data" --output_dir "$out" ;;
    knn)  # the last checkpoint, and the same network at initialisation
      run $PYTHON eval_knn.py --checkpoint "$last" "${evaluation[@]}" --nb_knn 10 20 100 200 --compare_init \
        ${floor[@]+"${floor[@]}"} ;;
    knn_curve)  # the earlier epochs' checkpoints, for the k-NN curve of plot_runs.py: one call, images decoded once
      if [ -n "$CURVE_EPOCHS" ]; then
        earlier=("${curve[@]}")
      else
        earlier=()
        for ckpt in "$out"/checkpoint[0-9][0-9][0-9][0-9].pth; do
          if [ "$ckpt" != "$last" ]; then earlier+=("$ckpt"); fi
        done
      fi
      if [ ${#earlier[@]} -gt 0 ]; then
        run $PYTHON eval_knn.py --checkpoint "${earlier[@]}" "${evaluation[@]}" --nb_knn 10 20 100 200
      fi ;;
    linear)
      run $PYTHON eval_linear.py --checkpoint "$last" "${evaluation[@]}" \
        --epochs "$LINEAR_EPOCHS" --output_json "$out/linear.json" ;;
    *) echo "unknown stage $stage (train, knn, linear, knn_curve)" >&2; exit 2 ;;
  esac
done
