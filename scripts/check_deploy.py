#!/usr/bin/env python3
"""Checks the packaging in deploy/ beyond what promtool and amtool see, and generates the two
Kubernetes manifests that embed other files.

    check_deploy.py --costwatch BIN --crd-modules DIR       check (scripts/check-deploy.sh)
    check_deploy.py --write                                 regenerate the embedded manifests

What it proves:
- Kubernetes: deploy/kubernetes/prometheusrule.yaml and grafana-dashboard.yaml embed exactly
  deploy/prometheus/rules.yml and deploy/grafana/dashboards/costwatch.json (no drift); the
  kustomize output has the parts a platform team relies on (probes, non-root read-only pod,
  secrets from Secrets, a migration, a PDB and a ServiceMonitor that select the pods, the
  dashboard's sidecar label); the ServiceMonitor and PrometheusRule pass the Prometheus
  Operator's CRD schemas (scripts/validate-crds.mjs with the npm package @kubernetes-models/prometheus-operator); and the ConfigMap's
  costwatch.toml passes `costwatch check-config` with the environment the container gets.
- Compose: every file it mounts exists, every service it depends on is defined, Prometheus
  scrapes the port costwatch listens on, and the configuration costwatch gets passes
  check-config (the image's ENV, then the service's environment).
- The image: every shared library the binary links comes from the runtime stage's packages.
- systemd: the unit verifies and its `systemd-analyze security` rating is OK or better.
- Rules: every alert of deploy/prometheus/rules.yml has a summary, a description and a
  runbook_url whose anchor is a section of docs/runbook.md.

Run with a Python that has PyYAML (scripts/check-deploy.sh uses .local/deploy-venv).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/kubernetes"
COMPOSE = ROOT / "deploy/compose"
RULES = ROOT / "deploy/prometheus/rules.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/costwatch.json"

GENERATED = "# Generated from {source} by `scripts/check_deploy.py --write`; edit that file, not this one.\n"

failures = []


def fail(message):
    failures.append(message)
    print(f"  FAILED: {message}")


def ok(message):
    print(f"  SUCCESS: {message}")


def check(condition, message):
    if condition:
        ok(message)
    else:
        fail(message)
    return condition


def indent(text, prefix):
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


# ------------------------------------------------------------------------------------ generation


def prometheus_rule():
    header = GENERATED.format(source="deploy/prometheus/rules.yml")
    return (
        header
        + "# The shipped rules for the Prometheus Operator; your Prometheus' ruleSelector must match\n"
        + "# these labels (kube-prometheus-stack: add release: <its release name>).\n"
        + "apiVersion: monitoring.coreos.com/v1\n"
        + "kind: PrometheusRule\n"
        + "metadata:\n"
        + "  name: costwatch\n"
        + "  labels:\n"
        + "    app.kubernetes.io/name: costwatch\n"
        + "spec:\n"
        + indent(RULES.read_text(), "  ")
    )


def grafana_dashboard():
    header = GENERATED.format(source="deploy/grafana/dashboards/costwatch.json")
    return (
        header
        + "# Grafana's dashboard sidecar (kube-prometheus-stack, the grafana chart) loads every\n"
        + "# ConfigMap labelled grafana_dashboard: \"1\", in the namespaces it watches.\n"
        + "apiVersion: v1\n"
        + "kind: ConfigMap\n"
        + "metadata:\n"
        + "  name: costwatch-dashboard\n"
        + "  labels:\n"
        + "    app.kubernetes.io/name: costwatch\n"
        + '    grafana_dashboard: "1"\n'
        + "data:\n"
        + "  costwatch.json: |\n"
        + indent(DASHBOARD.read_text(), "    ")
    )


GENERATORS = {
    K8S / "prometheusrule.yaml": prometheus_rule,
    K8S / "grafana-dashboard.yaml": grafana_dashboard,
}


def write_generated():
    for path, generate in GENERATORS.items():
        path.write_text(generate())
        print(f"wrote {path.relative_to(ROOT)}")


# ------------------------------------------------------------------------------------ helpers


def image_env():
    """The ENV of the Dockerfile's final stage: what every container starts with."""
    stages = re.split(r"^FROM\s", (ROOT / "Dockerfile").read_text(), flags=re.M)
    text = stages[-1].replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def check_config(costwatch, config_text, env, what):
    """Runs `costwatch check-config` on `config_text` with only `env` as COSTWATCH settings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "costwatch.toml"
        path.write_text(config_text)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("COSTWATCH")}
        clean.update(env)
        clean["COSTWATCH_CONFIG"] = str(path)
        result = subprocess.run([costwatch, "check-config"], env=clean, capture_output=True, text=True)
    check(
        result.returncode == 0,
        f"{what} passes costwatch check-config" + ("" if result.returncode == 0 else f":\n{result.stdout}{result.stderr}"),
    )


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# ------------------------------------------------------------------------------------ kubernetes


def check_kubernetes(costwatch, crd_modules, validate_bin):
    print("kubernetes:")
    for path, generate in GENERATORS.items():
        check(
            path.read_text() == generate(),
            f"{path.relative_to(ROOT)} embeds its source unchanged (else run scripts/check_deploy.py --write)",
        )

    rendered = run(["kubectl", "kustomize", str(K8S)])
    if not check(rendered.returncode == 0, "kubectl kustomize deploy/kubernetes renders"):
        print(rendered.stderr)
        return
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    check(listed == on_disk, f"kustomization.yaml lists every manifest ({sorted(on_disk - listed)} missing)")

    with tempfile.TemporaryDirectory() as tmp:
        # Core objects against Kubernetes' own schemas, unknown fields refused.
        core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
        core += [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
        core_file = Path(tmp) / "core.yaml"
        core_file.write_text(yaml.safe_dump_all(core))
        result = run([validate_bin, "--strict", "--quiet", str(core_file)])
        check(
            result.returncode == 0,
            f"kubernetes-validate --strict: {len(core)} objects" + ("" if result.returncode == 0 else f"\n{result.stdout}{result.stderr}"),
        )
        # Prometheus Operator objects against the CRDs' schemas.
        crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
        crd_file = Path(tmp) / "crds.json"
        crd_file.write_text(json.dumps(crds))
        result = run(["node", str(ROOT / "scripts/validate-crds.mjs"), str(crd_modules), str(crd_file)])
        check(
            result.returncode == 0 and len(crds) == 2,
            f"ServiceMonitor and PrometheusRule pass the Prometheus Operator CRD schemas\n{result.stdout}{result.stderr}".rstrip(),
        )

    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    labels = pod["metadata"]["labels"]

    def selects(selector):
        return all(labels.get(k) == v for k, v in selector["matchLabels"].items())

    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe is /healthz")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe is /readyz")
    requests = container.get("resources", {}).get("requests", {})
    check({"cpu", "memory"} <= requests.keys(), f"resource requests are set ({requests})")
    security = container["securityContext"]
    check(
        spec["securityContext"].get("runAsNonRoot") is True
        and security.get("readOnlyRootFilesystem") is True
        and security.get("allowPrivilegeEscalation") is False
        and security.get("capabilities", {}).get("drop") == ["ALL"],
        "the pod runs as non-root with a read-only root filesystem and no capabilities",
    )
    check(spec.get("terminationGracePeriodSeconds", 30) > 30, "termination grace outlasts the final flush's 30 s of retries")
    init_args = [c.get("args") for c in spec.get("initContainers", [])]
    check(["migrate"] in init_args, "an init container runs costwatch migrate")
    env = {e["name"]: e for e in container["env"]}
    check(
        env.get("COSTWATCH__HTTP__LISTEN", {}).get("value", "").startswith("0.0.0.0:"),
        "the container listens on all interfaces",
    )
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})}
    check(
        "COSTWATCH__DATABASE__URL" in env and "secretKeyRef" in env["COSTWATCH__DATABASE__URL"].get("valueFrom", {}),
        "database.url comes from a Secret",
    )
    example_secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d}
    mounted_secrets = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for name in sorted(secret_refs | mounted_secrets):
        check(name in example_secrets, f"Secret {name} is described in secret.example.yaml")
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] in example_secrets:
            check(ref["key"] in example_secrets[ref["name"]]["stringData"], f"secret key {ref['name']}/{ref['key']} is in the example")

    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    (service,) = by_kind["Service"]
    check(
        all(labels.get(k) == v for k, v in service["spec"]["selector"].items()) and service["spec"]["ports"][0]["targetPort"] == "http",
        "the Service selects the pods' http port",
    )
    check(service["metadata"]["name"] == "costwatch", 'the Service is named costwatch, so Prometheus labels job="costwatch" as the rules expect')
    (monitor,) = by_kind["ServiceMonitor"]
    check(
        all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        and monitor["spec"]["endpoints"][0]["port"] == "http",
        "the ServiceMonitor selects the Service's http port",
    )
    (pdb,) = by_kind["PodDisruptionBudget"]
    check(selects(pdb["spec"]["selector"]), "the PodDisruptionBudget selects the pods")
    (policy,) = by_kind["NetworkPolicy"]
    check(selects(policy["spec"]["podSelector"]), "the NetworkPolicy selects the pods")
    ingress_ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
    check("http" in ingress_ports or port in ingress_ports, "the NetworkPolicy admits the HTTP port")
    dashboards = [c for c in by_kind["ConfigMap"] if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    check(
        len(dashboards) == 1 and json.loads(dashboards[0]["data"]["costwatch.json"]) == json.loads(DASHBOARD.read_text()),
        'the dashboard ConfigMap has the sidecar label grafana_dashboard: "1" and the shipped dashboard',
    )
    (rule,) = by_kind["PrometheusRule"]
    check(rule["spec"] == yaml.safe_load(RULES.read_text()), "the PrometheusRule holds deploy/prometheus/rules.yml")

    # The configuration exactly as the container sees it: the mounted ConfigMap, the image's
    # ENV, then the pod's env (secret values replaced by well-formed stand-ins).
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    config_map = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == config_volume["configMap"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    config_path = env["COSTWATCH_CONFIG"]["value"]
    check(config_path.startswith(mount["mountPath"] + "/"), f"COSTWATCH_CONFIG ({config_path}) is inside the ConfigMap's mount")
    config_text = config_map["data"][Path(config_path).name]
    stand_ins = {
        "database-url": "postgres://costwatch:stand-in@postgres.db.svc:5432/costwatch",
        "database-password": "stand-in-password",
        "kafka-sasl-password": "stand-in-sasl-password",
        "api-token": "stand-in-token-0123456789",
        "webhook-secret": "stand-in-secret-0123456789",
    }
    container_env = image_env()
    for name, e in env.items():
        if "value" in e:
            container_env[name] = e["value"]
        else:
            container_env[name] = stand_ins[e["valueFrom"]["secretKeyRef"]["key"]]
    if costwatch:
        check_config(costwatch, config_text, container_env, "the ConfigMap's costwatch.toml with the Deployment's environment")


# ------------------------------------------------------------------------------------ compose


def check_compose(costwatch, jsonschema_bin):
    print("compose:")
    path = COMPOSE / "compose.yaml"
    result = run([jsonschema_bin, "--builtin-schema", "vendor.compose-spec", str(path)])
    check(result.returncode == 0, "compose.yaml matches the Compose Specification's schema" + ("" if result.returncode == 0 else f"\n{result.stdout}{result.stderr}"))
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    for name, service in services.items():
        check("image" in service or "build" in service, f"service {name} has an image or a build")
        depends = service.get("depends_on", {})
        for dep in depends if isinstance(depends, (list, dict)) else []:
            check(dep in services, f"service {name} depends on {dep}, which is defined")
        build = service.get("build")
        if isinstance(build, dict):
            context = (COMPOSE / build["context"]).resolve()
            check((context / build.get("dockerfile", "Dockerfile")).is_file(), f"service {name} builds from an existing Dockerfile")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source.startswith((".", "/")):
                check((COMPOSE / source).exists(), f"service {name} mounts {source}, which exists")
            else:
                check(source in compose.get("volumes", {}), f"service {name} uses the named volume {source}, which is declared")

    def mounted(service, container_path):
        for volume in service.get("volumes", []):
            parts = volume.split(":")
            if parts[1] == container_path:
                return (COMPOSE / parts[0]).resolve()
        return None

    # Every service that runs the costwatch image gets a configuration that check-config accepts.
    costwatch_services = [n for n, s in services.items() if "build" in s or str(s.get("image", "")).startswith("costwatch")]
    check(len(costwatch_services) >= 2, f"costwatch and its loadgen run the image ({costwatch_services})")
    listen = None
    for name in costwatch_services:
        service = services[name]
        env = image_env()
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
        config_file = mounted(service, env["COSTWATCH_CONFIG"])
        if not check(config_file is not None and config_file.is_file(), f"service {name} mounts its configuration at {env['COSTWATCH_CONFIG']}"):
            continue
        if costwatch:
            check_config(costwatch, config_file.read_text(), {k: v for k, v in env.items() if k != "COSTWATCH_CONFIG"}, f"the configuration of service {name}")
        if name == "costwatch":
            listen = env.get("COSTWATCH__HTTP__LISTEN")

    # Prometheus scrapes costwatch where it listens, and loads the shipped rules.
    prometheus = services["prometheus"]
    prom_config_path = mounted(prometheus, "/etc/prometheus/prometheus.yml")
    prom_config = yaml.safe_load(prom_config_path.read_text())
    targets = [t for job in prom_config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    port = listen.rsplit(":", 1)[1] if listen else None
    check(f"costwatch:{port}" in targets, f"Prometheus scrapes costwatch:{port}, where costwatch listens")
    check(mounted(prometheus, "/etc/prometheus/rules.yml") == RULES, "Prometheus loads deploy/prometheus/rules.yml")
    with tempfile.TemporaryDirectory() as tmp:
        for container_path in ("/etc/prometheus/prometheus.yml", "/etc/prometheus/rules.yml"):
            Path(tmp, Path(container_path).name).write_text(mounted(prometheus, container_path).read_text())
        result = run(["promtool", "check", "config", str(Path(tmp, "prometheus.yml"))])
        check(result.returncode == 0, "promtool check config accepts the compose Prometheus configuration" + ("" if result.returncode == 0 else f"\n{result.stdout}{result.stderr}"))
    grafana = services["grafana"]
    check(
        mounted(grafana, "/var/lib/grafana/dashboards/costwatch") == DASHBOARD.parent,
        "Grafana is provisioned with the shipped dashboards",
    )
    datasources = yaml.safe_load(mounted(grafana, "/etc/grafana/provisioning/datasources/costwatch.yaml").read_text())
    types = {d["type"] for d in datasources["datasources"]}
    check({"prometheus", "grafana-postgresql-datasource"} <= types, "Grafana gets a Prometheus and a PostgreSQL data source")


# ------------------------------------------------------------------------------------ image


def check_image_libraries(costwatch):
    """Every shared library the binary needs is installed by the runtime stage, or is part of
    debian:bookworm-slim. The binary built here links what the image's build links (same
    Cargo features, same Debian release)."""
    print("image:")
    if not costwatch:
        fail("no costwatch binary given")
        return
    readelf = run(["readelf", "-d", costwatch])
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", readelf.stdout)
    stages = re.split(r"^FROM\s", (ROOT / "Dockerfile").read_text(), flags=re.M)
    runtime = stages[-1].replace("\\\n", " ")
    installed = set()
    for m in re.finditer(r"apt-get install ([^&]*)", runtime):
        installed |= {w for w in m.group(1).split() if not w.startswith("-")}
    # Packages of priority required/important in debian:bookworm-slim that a binary may link.
    in_base = {"libc6", "libgcc-s1", "zlib1g", "libzstd1", "liblzma5", "libstdc++6", "libgcrypt20", "libsystemd0", "libudev1"}
    for lib in needed:
        owner = run(["dpkg", "-S", f"*/{lib}"])
        packages = {line.split(":")[0] for line in owner.stdout.splitlines() if line}
        check(
            bool(packages & (installed | in_base)),
            f"{lib} (Debian {', '.join(sorted(packages)) or 'unknown package'}) is in the runtime image",
        )


# ------------------------------------------------------------------------------------ rules


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, spaces to dashes, no punctuation."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def check_runbook():
    print("rules:")
    runbook = ROOT / "docs/runbook.md"
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", runbook.read_text(), flags=re.M)}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            annotations = rule.get("annotations", {})
            url = annotations.get("runbook_url", "")
            path, _, anchor = url.partition("#")
            check(
                {"summary", "description"} <= annotations.keys()
                and path == "docs/runbook.md"
                and anchor in anchors,
                f"{name} has a summary, a description and a runbook_url to its section of docs/runbook.md ({url or 'none'})",
            )


# ------------------------------------------------------------------------------------ systemd


def check_systemd():
    print("systemd:")
    unit = ROOT / "deploy/systemd/costwatch.service"
    result = run(["systemd-analyze", "security", "--offline=true", str(unit)])
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    rating = match.group(2) if match else "unknown"
    check(
        match is not None and rating in ("OK", "SAFE", "PERFECT"),
        f"systemd-analyze security rates the unit {match.group(1) + ' ' + rating if match else rating} (OK or better)",
    )
    timeout = re.search(r"^TimeoutStopSec=(\d+)", unit.read_text(), flags=re.M)
    check(timeout is not None and int(timeout.group(1)) > 30, "TimeoutStopSec outlasts the final flush's 30 s of retries")
    # `verify` needs the ExecStart binaries to exist: point them at a stand-in.
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = Path(tmp, "costwatch")
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        copy = Path(tmp, "costwatch.service")
        copy.write_text(unit.read_text().replace("/usr/local/bin/costwatch", str(stand_in)))
        result = run(["systemd-analyze", "verify", str(copy)])
        check(result.returncode == 0 and not result.stderr.strip(), "systemd-analyze verify accepts the unit" + ("" if not result.stderr.strip() else f"\n{result.stderr}"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate the embedded Kubernetes manifests")
    parser.add_argument("--costwatch", help="the costwatch binary for check-config and the library check")
    parser.add_argument("--crd-modules", type=Path, help="node_modules holding @kubernetes-models/prometheus-operator")
    parser.add_argument("--kubernetes-validate", default="kubernetes-validate")
    parser.add_argument("--check-jsonschema", default="check-jsonschema")
    args = parser.parse_args()
    if args.write:
        write_generated()
        return 0
    check_kubernetes(args.costwatch, args.crd_modules, args.kubernetes_validate)
    check_compose(args.costwatch, args.check_jsonschema)
    check_image_libraries(args.costwatch)
    check_systemd()
    check_runbook()
    if failures:
        print(f"check_deploy: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
