# The classifier service: bentoml serve with ONNX Runtime, no torch, no CUDA. Two targets:
# - serve (docker compose, development): the packaged model and bento come from the project's
#   BentoML store (./bentoml_home), mounted read-only, so `make package` is all it takes.
# - image (`make image`): the same, with the packaged bento and its model inside: it runs
#   anywhere with no mounts, read-only root, as a non-root user (see docker/make-image.sh).
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a venv. With wheels in docker/wheels/serve (make wheels) the build needs no network;
# without them pip downloads from PyPI as usual.
FROM ${BASE_IMAGE} AS build
COPY docker/wheels/serve /wheels
COPY docker/requirements-serve.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && if ls /wheels/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi \
    && /opt/venv/bin/pip install --no-cache-dir $offline --find-links /wheels -r /tmp/requirements.txt

FROM ${BASE_IMAGE} AS serve
COPY --from=build /opt/venv /opt/venv
COPY docker/serve-entrypoint.sh /usr/local/bin/serve-entrypoint
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/bentoml BENTOML_DO_NOT_TRACK=true
RUN useradd --create-home --uid 10001 classifier && mkdir -p /bentoml \
    && mkdir /bentoml/envs && ln -s /dev/shm/bentoml/tmp /bentoml/tmp \
    && ln -s /dev/shm/bentoml/prometheus_multiproc_dir /bentoml/prometheus_multiproc_dir
USER classifier
WORKDIR /home/classifier
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=5 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2).status != 200)"
# Keep-alive longer than clients' idle expiry: otherwise a client can reuse a connection the
# server is closing at that moment, and the request fails with a reset (seen in bench/soak.py).
ENTRYPOINT ["/usr/local/bin/serve-entrypoint"]
CMD ["bentoml", "serve", "cifar4_classifier:latest", "--host", "0.0.0.0", "--port", "3000", "--timeout-keep-alive", "75"]

# make image: the bento and its model, staged (world-readable) by docker/make-image.sh, owned by root.
FROM serve AS image
COPY docker/image-store/ /bentoml/
ARG MODEL_VERSION=unknown
LABEL org.opencontainers.image.title="cifar4-classifier" \
      org.opencontainers.image.description="CIFAR-4 classifier (bird, boat, cat, dog): bentoml serve + ONNX Runtime" \
      org.opencontainers.image.version="${MODEL_VERSION}"
