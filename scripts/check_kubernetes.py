#!/usr/bin/env python3
"""Check deploy/kubernetes: each manifest against Kubernetes' own schema (kubernetes-validate,
strict: no unknown field), then what the schema cannot say about this pool.

- liveness asks /healthz (never DuckDB: busy workers do not make a pod look dead), readiness
  /readyz;
- the grace period covers the preStop sleep and the pool's graceful_timeout, so the kubelet's
  SIGKILL never cuts a drain short;
- the memory limit holds the pool the CPU limit sizes (128 MiB a worker at least);
- a Service, a PodDisruptionBudget, a HorizontalPodAutoscaler on CPU, a ConfigMap with the
  configuration and a Secret for SECRET_KEY are there, and refer to what exists.

Usage: scripts/check_kubernetes.py [DIR]     (default deploy/kubernetes; exit 1 naming every
problem)
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def quantity_bytes(text):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def main():
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy/kubernetes"
    manifests = sorted(directory.glob("*.yaml"))
    if not manifests:
        return report([f"no manifest in {directory}"], manifests)
    command = ["kubernetes-validate", "--strict", "--quiet"]
    problems = []
    validated = subprocess.run(command + [str(p) for p in manifests], capture_output=True, text=True)
    if validated.returncode != 0:
        problems.append("kubernetes-validate:\n" + validated.stdout + validated.stderr)
    docs = [d for p in manifests for d in yaml.safe_load_all(p.read_text()) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    missing = [kind for kind in ("ConfigMap", "Secret", "Deployment", "Service",
                                 "PodDisruptionBudget", "HorizontalPodAutoscaler")
               if kind not in by_kind]
    if missing:
        return report(problems + [f"no {kind}" for kind in missing], manifests)
    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if container["livenessProbe"]["httpGet"]["path"] != "/healthz":
        problems.append("liveness must ask /healthz")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        problems.append("readiness must ask /readyz")
    config = tomllib.loads(by_kind["ConfigMap"][0]["data"]["ferrocorn.toml"])
    graceful = config.get("graceful_timeout", 30) + config.get("deregistration_delay", 0)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = int(pre_stop[-1]) if Path(pre_stop[0]).name == "sleep" else 0
    grace = pod["terminationGracePeriodSeconds"]
    if grace <= sleep + graceful:
        problems.append(
            f"terminationGracePeriodSeconds {grace} must exceed the preStop sleep {sleep} "
            f"plus graceful_timeout and deregistration_delay {graceful}")
    limits = container["resources"]["limits"]
    workers = config.get("workers", max(1, -(-float(limits["cpu"]) // 1)))
    if quantity_bytes(limits["memory"]) < workers * (128 << 20):
        problems.append(f"memory limit {limits['memory']} holds fewer than {workers} workers")
    secret = by_kind["Secret"][0]["metadata"]["name"]
    env = {e["name"]: e for e in container.get("env", [])}
    if env.get("SECRET_KEY", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") != secret:
        problems.append("SECRET_KEY must come from the Secret")
    labels = deployment["spec"]["selector"]["matchLabels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = by_kind[kind][0]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        if selector != labels:
            problems.append(f"the {kind} does not select the Deployment's pods")
    hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
    if hpa["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problems.append("the HorizontalPodAutoscaler does not scale the Deployment")
    if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["metrics"]):
        problems.append("the HorizontalPodAutoscaler does not follow CPU")
    return report(problems, manifests)


def report(problems, manifests):
    for problem in problems:
        print(f"check_kubernetes: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_kubernetes: {len(manifests)} file(s) valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
