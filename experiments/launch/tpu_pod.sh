#!/usr/bin/env bash
# A TPU pod slice (e.g. v4-32: 4 TPU VM workers x 4 chips): the same command on every worker.
# jax reads the slice's workers from the TPU metadata, so no coordinator flags are needed.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash experiments/launch/tpu_pod.sh \
#     configs/deepcluster.py:cifar10 /mnt/shared/runs/dc-cifar10 --config.data.path=/mnt/shared/cifar10
#
# The workdir must be a file system every worker sees (Filestore NFS or a gcsfuse mount of a
# bucket): orbax writes one checkpoint from all workers together, process 0 writes the logs.
# Each worker reads only its own rows of the image bank, so the data set must be readable from
# every worker at the same path (the same shared mount, or a copy on each).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
config="${1:?config, e.g. configs/deepcluster.py:cifar10}"
workdir="${2:?workdir on a shared file system}"
shift 2
repo="${REPO_URL:-https://github.com/dcjax/dcjax.git}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d dcjax ] || git clone -q $repo dcjax
  cd dcjax && git pull -q && pip install -q -e '.[tpu]'
  python -m dcjax.main --config $config --workdir $workdir $*
"
