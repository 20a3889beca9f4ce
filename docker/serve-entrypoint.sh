#!/bin/sh
# The classifier container's entrypoint. BentoML writes its scratch (BENTOML_HOME/tmp and the
# Prometheus multiprocess folder) at start; /bentoml/tmp and /bentoml/prometheus_multiproc_dir
# link to /dev/shm, the tmpfs every container gets, so the image runs with a read-only root
# (docker run --read-only, Kubernetes readOnlyRootFilesystem) and no mounts.
set -e
mkdir -p /dev/shm/bentoml/tmp /dev/shm/bentoml/prometheus_multiproc_dir
export TMPDIR=/dev/shm/bentoml/tmp
exec "$@"
