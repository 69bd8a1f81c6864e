#!/usr/bin/env bash
# Two processes on this machine, CPU backend, 4 simulated devices each (8 in all), talking
# through gloo; the same program as a 2-host launch.
#
#   bash experiments/launch/local_two_process.sh configs/deepcluster.py:smoke runs/two-process
#
# Arguments: the config (default configs/deepcluster.py:smoke) and the workdir; further
# arguments go to every process (e.g. --config.num_cycles=3). Rerunning the same command
# resumes from the last checkpoint.
set -euo pipefail
config="${1:-configs/deepcluster.py:smoke}"
workdir="${2:-runs/two-process}"
shift $(( $# > 2 ? 2 : $# ))
port="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
pids=()
for id in 0 1; do
  python -m dcjax.main --config "$config" --workdir "$workdir" \
    --coordinator="127.0.0.1:$port" --num_processes=2 --process_id="$id" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
