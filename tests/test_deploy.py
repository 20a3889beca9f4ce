"""deploy/k8s/ against the Kubernetes schemas (offline), and the properties the issue asks of it."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_manifests_pass_strict_schema_validation():
    files = sorted(str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    assert files
    result = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 3


def test_deployment_is_two_hardened_replicas_with_probes_and_an_autoscaler():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "classifier.yaml").read_text())}
    spec = docs["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2 and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"requests", "limits"} <= set(container["resources"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert docs["Service"]["spec"]["selector"] == spec["selector"]["matchLabels"]
    # Only settings the service knows (it refuses unknown CLASSIFIER_* names at start).
    from pipeline.runtime.settings import Settings

    Settings.from_env({e["name"]: e["value"] for e in container.get("env", [])})
