#!/usr/bin/env bash
# Train InstantID (Resampler + face IP layers + IdentityNet) on SDXL. Every variable below can be edited here or
# set in the environment (e.g. `JSON_FILE=... CROSS_ID=1 NUM_GPUS=8 bash train_instantId_sdxl.sh`).
# Extra arguments are passed on to train_instantId_sdxl.py (e.g. `bash train_instantId_sdxl.sh --max_train_steps 10`).
# See docs/training.md for multi-node, DeepSpeed and the memory table.
set -euo pipefail
cd "$(dirname "$0")"

# ---- models ----------------------------------------------------------------------------------------------
MODEL_NAME=${MODEL_NAME:-"stabilityai/stable-diffusion-xl-base-1.0"}   # SDXL diffusers folder or hub id
CONTROLNET_NAME=${CONTROLNET_NAME:-"checkpoints/ControlNetModel"}      # IdentityNet; "" = initialise from the UNet
ADAPTOR_NAME=${ADAPTOR_NAME:-"checkpoints/ip-adapter.bin"}             # face adapter; "" = fresh Resampler/IP layers
VAE_NAME=${VAE_NAME:-""}                                              # e.g. madebyollin/sdxl-vae-fp16-fix

# ---- data (one of JSON_FILE / DATA_DIR / SHARDS) ---------------------------------------------------------
# JSON_FILE: get_face_info.py index, MFaceTech JSONL or seed-repo JSONL; DATA_DIR: extracted FaceID-6M/70K folder;
# SHARDS: folder written by `python -m faceid.train.webdataset_shards --data_json_file ... --out SHARDS`, or remote
#   shards streamed by every node: "https://host/shards/", "s3://bucket/shards/" (pip install s3fs), "gs://..."
#   (gcsfs), or "pipe:aws s3 cp s3://bucket/shards/shard-{000000..000335}.tar -" (docs/training.md).
JSON_FILE=${JSON_FILE:-"data/crossfaceid/index/index.jsonl"}
DATA_DIR=${DATA_DIR:-""}
SHARDS=${SHARDS:-""}
ROOT_DATA_DIR=${ROOT_DATA_DIR:-""}          # root for relative paths (MFaceTech's --data_root_path)
SKIP_BAD_SHARDS=${SKIP_BAD_SHARDS:-0}        # 1: go on without a shard still unreadable after SHARD_RETRIES
SHARD_RETRIES=${SHARD_RETRIES:-3}            #    (listed in OUTPUT_DIR/bad_shards.jsonl); 0: stop naming it
SHARD_LANES=${SHARD_LANES:-1}                # remote shards: set to WORKERS so each shard is streamed once per rank
CROSS_ID=${CROSS_ID:-1}                      # 1: face embedding from another image of the same person
CROSS_ID_PROB=${CROSS_ID_PROB:-1.0}

# ---- memory preset (docs/training.md, "Memory per GPU") ----------------------------------------------------
# 24gb: IdentityNet + adapter at 1024 px on one 24 GB GPU: gradient checkpointing, AdamW8bit stepped during backward
# (--optimizer_in_backward: gradients never all held), no autocast weight cache, bf16, batch 1 unless BATCH_SIZE is
# set. One GPU, GRAD_ACCUM=1; MAX_GRAD_NORM clips each parameter's gradient on its own. "": the flags below as set.
PRESET=${PRESET:-""}

# ---- output and schedule ---------------------------------------------------------------------------------
OUTPUT_DIR=${OUTPUT_DIR:-"output/instantid-crossid"}
RESOLUTION=${RESOLUTION:-1024}
[ "$PRESET" = "24gb" ] && BATCH_SIZE=${BATCH_SIZE:-1} && MIXED_PRECISION=${MIXED_PRECISION:-"bf16"}
BATCH_SIZE=${BATCH_SIZE:-2}                  # per GPU
GRAD_ACCUM=${GRAD_ACCUM:-1}
LEARNING_RATE=${LEARNING_RATE:-1e-5}
MAX_STEPS=${MAX_STEPS:-100000}
CHECKPOINT_STEPS=${CHECKPOINT_STEPS:-2000}
CHECKPOINTS_LIMIT=${CHECKPOINTS_LIMIT:-5}
VALIDATION_STEPS=${VALIDATION_STEPS:-2000}
MIXED_PRECISION=${MIXED_PRECISION:-"fp16"}   # fp16 | bf16 | no
WORKERS=${WORKERS:-8}
RESUME=${RESUME:-"latest"}                   # latest | path | "" (start fresh)

# ---- scale and quality (docs/training.md) ----------------------------------------------------------------
CACHE_DIR=${CACHE_DIR:-""}                   # folder from precompute_cache.py: latents/text read, not computed
USE_EMA=${USE_EMA:-0}                        # 1: EMA of the trained weights, exported as the final weights
EMA_DECAY=${EMA_DECAY:-0.9999}
ID_LOSS_WEIGHT=${ID_LOSS_WEIGHT:-0}          # > 0: identity loss (needs models/antelopev2/glintr100.onnx)
ID_LOSS_MAX_TIMESTEP=${ID_LOSS_MAX_TIMESTEP:-400}
COMPILE=${COMPILE:-0}                        # 1: torch.compile UNet + IdentityNet (first step compiles for minutes)
CHANNELS_LAST=${CHANNELS_LAST:-0}            # 1: convolutions in NHWC (faster on tensor-core GPUs); AdamW is fused on CUDA

# ---- identity monitoring (docs/training.md#monitoring-identity-and-collapse; report: python report_run.py OUTPUT_DIR)
VALIDATION_PERSONS=${VALIDATION_PERSONS:-8}  # persons held out of training, scored at every VALIDATION_STEPS; 0: off
VALIDATION_INDEX=${VALIDATION_INDEX:-""}     # or: score these persons' photos instead (nothing held out)
FACE_MODEL=${FACE_MODEL:-"models/antelopev2"}  # insightface pack that scores validation (Face Sim)
CLIP_MODEL=${CLIP_MODEL:-""}                 # a CLIP model folder: also log CLIP-T
COLLAPSE_CHECK_STEPS=${COLLAPSE_CHECK_STEPS:-200}  # face-token spread + loss gap every N steps; warns on collapse; 0: off

# ---- launch ----------------------------------------------------------------------------------------------
NUM_GPUS=${NUM_GPUS:-1}                      # per node
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-"127.0.0.1"}
MAIN_PORT=${MAIN_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-""}   # e.g. configs/accelerate/deepspeed_zero2.yaml

args=(
  --pretrained_model_name_or_path "$MODEL_NAME"
  --output_dir "$OUTPUT_DIR"
  --resolution "$RESOLUTION"
  --train_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --learning_rate "$LEARNING_RATE"
  --max_train_steps "$MAX_STEPS"
  --checkpointing_steps "$CHECKPOINT_STEPS"
  --checkpoints_total_limit "$CHECKPOINTS_LIMIT"
  --validation_steps "$VALIDATION_STEPS"
  --mixed_precision "$MIXED_PRECISION"
  --dataloader_num_workers "$WORKERS"
  --gradient_checkpointing
)
[ -n "$CONTROLNET_NAME" ] && args+=(--controlnet_model_name_or_path "$CONTROLNET_NAME")
[ -n "$ADAPTOR_NAME" ] && args+=(--pretrained_ip_adapter_path "$ADAPTOR_NAME")
[ -n "$VAE_NAME" ] && args+=(--pretrained_vae_model_name_or_path "$VAE_NAME")
[ -n "$ROOT_DATA_DIR" ] && args+=(--data_root_path "$ROOT_DATA_DIR")
if [ -n "$SHARDS" ]; then
  args+=(--train_shards "$SHARDS" --shard_retries "$SHARD_RETRIES" --shard_lanes "$SHARD_LANES")
  [ "$SKIP_BAD_SHARDS" = "1" ] && args+=(--skip_bad_shards)
elif [ -n "$DATA_DIR" ]; then
  args+=(--train_data_dir "$DATA_DIR")
else
  args+=(--data_json_file "$JSON_FILE")
fi
[ "$CROSS_ID" = "1" ] && args+=(--cross_id --cross_id_prob "$CROSS_ID_PROB")
[ -n "$RESUME" ] && args+=(--resume_from_checkpoint "$RESUME")
[ -n "$CACHE_DIR" ] && args+=(--precomputed_cache "$CACHE_DIR")
[ "$USE_EMA" = "1" ] && args+=(--use_ema --ema_decay "$EMA_DECAY")
[ "$COMPILE" = "1" ] && args+=(--compile)
[ "$CHANNELS_LAST" = "1" ] && args+=(--channels_last)
if [ -n "$VALIDATION_INDEX" ]; then
  args+=(--validation_index "$VALIDATION_INDEX")
else
  args+=(--validation_persons "$VALIDATION_PERSONS")
fi
args+=(--validation_face_model "$FACE_MODEL" --collapse_check_steps "$COLLAPSE_CHECK_STEPS")
[ -n "$CLIP_MODEL" ] && args+=(--validation_clip_model "$CLIP_MODEL")
[ "$ID_LOSS_WEIGHT" != "0" ] && args+=(--id_loss_weight "$ID_LOSS_WEIGHT" --id_loss_max_timestep "$ID_LOSS_MAX_TIMESTEP")

TOTAL=$((NUM_GPUS * NUM_NODES))
case "$PRESET" in
  "") ;;
  24gb)
    if [ "$MIXED_PRECISION" = "fp16" ] || [ "$TOTAL" != "1" ] || [ "$GRAD_ACCUM" != "1" ] || [ -n "$ACCELERATE_CONFIG" ]; then
      echo "PRESET=24gb steps the optimizer during backward: it needs MIXED_PRECISION=bf16 (or no), one GPU," \
           "GRAD_ACCUM=1 and no ACCELERATE_CONFIG (got $MIXED_PRECISION, $TOTAL GPUs, $GRAD_ACCUM," \
           "'${ACCELERATE_CONFIG}'); several GPUs: configs/accelerate/deepspeed_zero2.yaml without the preset" >&2
      exit 2
    fi
    args+=(--use_8bit_adam --optimizer_in_backward --no-autocast_cache) ;;  # checkpointing is always on
  *) echo "PRESET=$PRESET: unknown (24gb, or empty for none)" >&2; exit 2 ;;
esac
launch=(accelerate launch --mixed_precision "$MIXED_PRECISION")
if [ -n "$ACCELERATE_CONFIG" ]; then
  launch+=(--config_file "$ACCELERATE_CONFIG" --num_processes "$TOTAL" --num_machines "$NUM_NODES"
           --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
elif [ "$TOTAL" -gt 1 ]; then
  launch+=(--multi_gpu --num_processes "$TOTAL" --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
           --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
else
  launch+=(--num_processes 1 --num_machines 1)
fi

echo "OUTPUT_DIR: $OUTPUT_DIR ($TOTAL processes${PRESET:+, preset $PRESET})"
if [ "${DRY_RUN:-0}" = "1" ]; then  # print the command instead of running it
  printf '%q ' "${launch[@]}" train_instantId_sdxl.py "${args[@]}" "$@"; echo; exit 0
fi
exec "${launch[@]}" train_instantId_sdxl.py "${args[@]}" "$@"
