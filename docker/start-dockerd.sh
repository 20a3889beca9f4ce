#!/usr/bin/env bash
# Start a Docker engine with no bridge network (all traffic stays on 127.0.0.1) when none
# answers; prints the PID to stop it with. For CI and machines without a running engine.
set -euo pipefail
if docker info >/dev/null 2>&1; then echo "engine already running"; exit 0; fi
log=${DOCKERD_LOG:-/tmp/dockerd.log}
nohup dockerd --bridge=none --iptables=false --ip-masq=false >"$log" 2>&1 &
echo $! > /tmp/dockerd.pid
for _ in $(seq 60); do docker info >/dev/null 2>&1 && { echo "dockerd $(cat /tmp/dockerd.pid)"; exit 0; }; sleep 1; done
echo "dockerd did not start: $(tail -5 "$log")" >&2
exit 1
