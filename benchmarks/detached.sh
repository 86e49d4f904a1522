#!/usr/bin/env bash
# Run a long job in the background, in its own session (setsid), so that it outlives the shell or the remote
# command that started it: for GPU machines reached through remote commands with a time limit.
#
#   bash benchmarks/detached.sh start DIR 'COMMAND'   # runs COMMAND detached; log DIR/job.log, exit code DIR/job.rc
#   bash benchmarks/detached.sh wait DIR              # waits up to 9 minutes or until the job ends; tail of the log
#   bash benchmarks/detached.sh finish DIR            # blocks until the job ends; prints its exit code
set -uo pipefail
step=${1:?usage: detached.sh start DIR COMMAND | wait DIR | finish DIR}
dir=${2:?directory}
ended() { [[ -f $dir/job.rc ]]; }

case "$step" in
  start)
    mkdir -p "$dir"
    rm -f "$dir/job.rc"
    setsid bash -c "${3:?command}; echo \$? > '$dir/job.rc'" < /dev/null > "$dir/job.log" 2>&1 &
    echo "started in $dir: $3"
    ;;
  wait)
    for _ in $(seq 1 54); do ended && break; sleep 10; done
    tail -5 "$dir/job.log"
    ended && echo "job finished (rc $(cat "$dir/job.rc"))" || echo "still running"
    ;;
  finish)
    until ended; do sleep 10; done
    echo "job rc $(cat "$dir/job.rc")"
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
