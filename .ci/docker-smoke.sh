#!/usr/bin/env bash
# CI stage for `docker compose up`: engine, base image and wheels made locally, the stack
# built and started with host networking on 127.0.0.1, checked, then torn down.
# Expects a packaged model in ./bentoml_home and runs in ./mlflow.db (made by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
bash docker/install-compose.sh
own_engine=0
if ! docker info >/dev/null 2>&1; then bash docker/start-dockerd.sh; own_engine=1; fi
export BIND_HOST=127.0.0.1 BASE_IMAGE=localhost/python-base:3.11
# Host networking: the classifier reaches MLflow on 127.0.0.1; it checks the alias every 2 s here.
export FOLLOW_TRACKING_URI=http://127.0.0.1:5000 CLASSIFIER_FOLLOW_INTERVAL_S=2 HOST_UID=$(id -u) HOST_GID=$(id -g)
compose=(docker compose -f compose.yaml -f docker/compose.ci.yaml)
cleanup() {
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  docker rm -f cifar4-image-check >/dev/null 2>&1 || true
  if [ "$own_engine" = 1 ] && [ -f /tmp/dockerd.pid ]; then kill "$(cat /tmp/dockerd.pid)" 2>/dev/null || true; fi
}
trap cleanup EXIT
bash docker/make-base-image.sh "$BASE_IMAGE"
make wheels
"${compose[@]}" build --quiet

echo "== make image: the bento and its model in one image; run read-only, no mounts, non-root"
DOCKER_BUILD_NETWORK=host make image
docker run -d --name cifar4-image-check --network host --read-only cifar4-classifier:latest \
  bentoml serve cifar4_classifier:latest --host 127.0.0.1 --port 3000 >/dev/null
for _ in $(seq 60); do
  [ "$(docker inspect cifar4-image-check --format '{{.State.Health.Status}}')" = healthy ] && break; sleep 1
done
docker inspect cifar4-image-check --format 'image container: health {{.State.Health.Status}}, read-only root {{.HostConfig.ReadonlyRootfs}}, {{len .Mounts}} mounts'
[ "$(docker inspect cifar4-image-check --format '{{.State.Health.Status}} {{.HostConfig.ReadonlyRootfs}} {{len .Mounts}}')" = "healthy true 0" ]
[ "$(docker exec cifar4-image-check id -u)" != 0 ] || { echo "image runs as root"; exit 1; }
.venv/bin/python - <<'PY'
import glob, httpx, numpy as np
from pipeline.runtime.imaging import decode_image
from pipeline.runtime.onnx_model import OnnxClassifier

store = "bentoml_home/models/cifar4-classifier"
model = OnnxClassifier.from_dir(f"{store}/{open(f'{store}/latest').read().strip()}")
path = (sorted(glob.glob("../shared/data/cifar4/train/boat/*.jpg")) or sorted(glob.glob(".ci-toy/boat/*")))[0]
data = open(path, "rb").read()
body = httpx.post("http://127.0.0.1:3000/classify", files={"image": data}, timeout=30).json()
got = np.array([body["probabilities"][c] for c in model.classes])
probabilities, scores = model.predict(decode_image(data, model.image_size))
assert np.abs(got - probabilities[0]).max() < 1e-5, body
assert body["out_of_scope"] is bool(model.out_of_scope(scores)[0]), body  # the threshold stored with the model
print(f"image /classify: {body['label']} {got.max():.3f}, out of scope {body['out_of_scope']}, "
      f"model version {body['model']['version']} (matches the store)")
PY
docker rm -f cifar4-image-check >/dev/null
up=$(date +%s)
"${compose[@]}" up -d --wait --wait-timeout 120
echo "stack healthy $(( $(date +%s) - up )) s after up"
docker image inspect cifar4-classifier:latest --format 'self-contained image: {{.Size}} bytes'
[ "$(docker exec cifar4-classifier-1 id -u)" != 0 ] || { echo "classifier runs as root"; exit 1; }
.venv/bin/python - <<'PY'
import glob, os, httpx, numpy as np
from mlflow.tracking import MlflowClient
from pipeline.runtime.imaging import decode_image
from pipeline.runtime.onnx_model import OnnxClassifier

images = sorted(glob.glob("../shared/data/cifar4/train/boat/*.jpg"))[:3] or sorted(glob.glob(".ci-toy/boat/*"))[:3]
store = "bentoml_home/models/cifar4-classifier"
model = OnnxClassifier.from_dir(f"{store}/{open(f'{store}/latest').read().strip()}")  # the version being served
for path in images:
    data = open(path, "rb").read()
    body = httpx.post("http://127.0.0.1:3000/classify", files={"image": data}, timeout=30).json()
    got = np.array([body["probabilities"][c] for c in model.classes])
    expected = model.predict_proba(decode_image(data, model.image_size))[0]
    assert np.abs(got - expected).max() < 1e-5, (got, expected)
    print(f"container /classify {os.path.basename(path)}: {body['label']} {got.max():.3f} (matches in-process)")
    explained = httpx.post("http://127.0.0.1:3000/explain", files={"image": data}, timeout=30).json()
    assert explained["probabilities"] == body["probabilities"] and explained["saliency"]["overlay"], explained.keys()
page = httpx.get("http://127.0.0.1:3000/ui")
assert page.status_code == 200 and 'id="file"' in page.text, "container /ui"
print(f"container /explain answers with {len(explained['stages'])} stages; /ui is served")
assert httpx.get("http://127.0.0.1:5000/health").status_code == 200
assert httpx.get("http://127.0.0.1:5000/").status_code == 200, "MLflow UI root"
client = MlflowClient("http://127.0.0.1:5000")
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
local = MlflowClient(f"sqlite:///{os.getcwd()}/mlflow.db")
ids = {r.info.run_id for r in local.search_runs([e.experiment_id for e in local.search_experiments()])}
assert ids and ids <= {r.info.run_id for r in runs}, "runs logged in CI are not listed by the compose MLflow"
print(f"compose MLflow lists the {len(ids)} run(s) logged in CI")
PY

echo "== the classifier follows the champion alias through the compose MLflow server"
.venv/bin/python - <<'PY'
import glob, threading, time, httpx, mlflow
from mlflow.tracking import MlflowClient

server, url, name = "http://127.0.0.1:5000", "http://127.0.0.1:3000", "cifar4-classifier"
image = open((sorted(glob.glob("../shared/data/cifar4/train/boat/*.jpg")) or sorted(glob.glob(".ci-toy/boat/*")))[0], "rb").read()
model = httpx.get(f"{url}/model").json()
follow = model["follow"]
assert follow["tracking_server"] == "reachable" and follow["serving_version"] == model["model_version"], follow
before = model["model_version"]
client = MlflowClient(server)
champion = client.get_model_version_by_alias(name, "champion")
mlflow.set_tracking_uri(server)
# A second version (the champion run's model registered again, through the server), then the alias moves.
new = mlflow.register_model(client.get_run(champion.run_id).data.tags["model_uri"], name).version
failures, answers, running = [], [], True

def load():
    with httpx.Client(timeout=30) as http:
        while running:
            try:
                response = http.post(f"{url}/classify", files={"image": ("boat.jpg", image, "image/jpeg")})
                (answers if response.status_code == 200 else failures).append(response)
            except httpx.HTTPError as error:
                failures.append(error)

threads = [threading.Thread(target=load) for _ in range(4)]
for thread in threads:
    thread.start()
time.sleep(1)
moved = time.time()
client.set_registered_model_alias(name, "champion", new)
deadline, seen = moved + 2 * 2 + 10, None
while time.time() < deadline:
    versions = {httpx.post(f"{url}/classify", files={"image": image}, timeout=30).json()["model"]["version"]
                for _ in range(6)}
    if versions == {str(new)}:
        seen = time.time() - moved
        break
    time.sleep(0.2)
running = False
for thread in threads:
    thread.join()
assert seen is not None, f"/classify still answers {versions} {time.time() - moved:.0f} s after the alias moved"
assert not failures, failures[:3]
print(f"alias moved {before} -> {new}: every worker answered with version {new} {seen:.1f} s later; "
      f"{len(answers)} requests during the move, 0 failed")
PY
"${compose[@]}" down -v
echo "docker stage took $(( $(date +%s) - started )) s"
