# MLflow tracking server and UI (sqlite backend, artifacts served through the server).
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: a venv. With wheels in docker/wheels/mlflow (make wheels) the build needs no network;
# without them pip downloads from PyPI as usual.
FROM ${BASE_IMAGE} AS build
COPY docker/wheels/mlflow /wheels
COPY docker/requirements-mlflow.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && if ls /wheels/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi \
    && /opt/venv/bin/pip install --no-cache-dir $offline --find-links /wheels -r /tmp/requirements.txt

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
RUN useradd --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=5 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=2).status != 200)"
# The sqlite store and artifacts live in /store (a volume or a bind mount of the project).
CMD ["mlflow", "server", "--backend-store-uri", "sqlite:////store/mlflow.db", "--artifacts-destination", "/store/mlartifacts", \
     "--serve-artifacts", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
