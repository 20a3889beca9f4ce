#!/usr/bin/env bash
# make image: an OCI image of the packaged bento with its model inside, tagged with the model's
# registered version (cifar4-classifier:v3) and :latest. CPU-only, no torch, non-root, /readyz
# healthcheck, read-only root: `docker run --rm -p 127.0.0.1:3000:3000 cifar4-classifier:latest`.
# Uses what `make package` left in $BENTOML_HOME (default ./bentoml_home). BASE_IMAGE as in compose.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_HOME=${BENTOML_HOME:-$PWD/bentoml_home}
python=${PYTHON:-.venv/bin/python}
name=${IMAGE_NAME:-cifar4-classifier}
stage=docker/image-store
# The bento that `bentoml serve cifar4_classifier:latest` would serve, and the model it uses.
read -r bento model version < <("$python" - <<'PY'
import sys
import bentoml
from pipeline.runtime.settings import Settings

try:
    bento = bentoml.bentos.get("cifar4_classifier:latest")
    model = bentoml.models.get(Settings.from_env().model)
except bentoml.exceptions.NotFound as error:
    sys.exit(f"make image: nothing packaged in the BentoML store ({error}); run `make package` first.")
print(bento.tag, model.tag, model.info.metadata.get("model_version", "0"))
PY
)
rm -rf "$stage"
mkdir -p "$stage/bentos/${bento%%:*}" "$stage/models/${model%%:*}"
cp -r "$BENTOML_HOME/bentos/${bento%%:*}/${bento#*:}" "$stage/bentos/${bento%%:*}/"
cp -r "$BENTOML_HOME/models/${model%%:*}/${model#*:}" "$stage/models/${model%%:*}/"
echo "${bento#*:}" > "$stage/bentos/${bento%%:*}/latest"
echo "${model#*:}" > "$stage/models/${model%%:*}/latest"
chmod -R a+rX,go-w "$stage"
docker build --quiet ${DOCKER_BUILD_NETWORK:+--network "$DOCKER_BUILD_NETWORK"} \
  -f docker/classifier.Dockerfile --target image \
  --build-arg BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}" --build-arg MODEL_VERSION="v$version" \
  -t "$name:v$version" -t "$name:latest" . >/dev/null
rm -rf "$stage"
size=$(docker image inspect "$name:v$version" --format '{{.Size}}')
echo "built $name:v$version and $name:latest: bento $bento, model $model (registered version $version), $((size / 1000000)) MB"
