# The classifier service: bentoml serve with ONNX Runtime, no torch, no CUDA.
# The packaged model and bento come from the project's BentoML store (./bentoml_home),
# mounted read-only at run time, so `make package` is all it takes to serve a new champion.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a venv. With wheels in docker/wheels/serve (make wheels) the build needs no network;
# without them pip downloads from PyPI as usual.
FROM ${BASE_IMAGE} AS build
COPY docker/wheels/serve /wheels
COPY docker/requirements-serve.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && if ls /wheels/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi \
    && /opt/venv/bin/pip install --no-cache-dir $offline --find-links /wheels -r /tmp/requirements.txt

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/bentoml BENTOML_DO_NOT_TRACK=true
RUN useradd --create-home --uid 10001 classifier && mkdir -p /bentoml && chown classifier /bentoml
USER classifier
WORKDIR /home/classifier
EXPOSE 3000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=5 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2).status != 200)"
# Keep-alive longer than clients' idle expiry: otherwise a client can reuse a connection the
# server is closing at that moment, and the request fails with a reset (seen in bench/soak.py).
CMD ["bentoml", "serve", "cifar4_classifier:latest", "--host", "0.0.0.0", "--port", "3000", "--timeout-keep-alive", "75"]
