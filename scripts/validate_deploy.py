#!/usr/bin/env python3
"""Checks deploy/ and the Dockerfile without a cluster (scripts/validate_deploy.sh).

1. Renders the kustomize base and every overlay under deploy/kubernetes:
   with `kustomize build` or `kubectl kustomize` when one is installed, and
   always with the small renderer below (resources, and strategic-merge
   patches for the list keys the manifests use). When both ran they must
   agree, so the renderer stays honest for machines without kustomize.
2. Validates every rendered resource, and every `*.example.yaml`, with
   kubernetes-validate in strict mode (unknown fields are errors) against
   each pinned Kubernetes version's bundled schemas: no network.
3. Checks what the schemas cannot: every strata configuration key used in
   the ConfigMap, in `-D` arguments, in STRATA_PROPERTIES and in the systemd
   example files is one that src/config/keys.rs defines; the ports in the
   configuration match the containers' named ports, the `--bind` and
   `--jobmanager` arguments and the Service; probes name ports that exist
   and HTTP paths that src/web/mod.rs routes; the config file is mounted
   from the ConfigMap that holds it; every path strata writes is on a
   writable volume; every strata container gets the cluster secret.
4. Parses the Dockerfile with BuildKit's parser and lints it (stages and
   targets, the non-root user, the entrypoint, files the build needs that
   .dockerignore would leave out).

Exits 1 naming every problem found; prints one line per check otherwise.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(resource: dict) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------- rendering

# Strategic-merge keys of the lists the patches touch (Kubernetes' own
# patchMergeKey for each); any other list is replaced, as in Kubernetes.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def merge_key(field: str, items: list) -> str | None:
    if field == "ports":
        return "containerPort" if any("containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def strategic_merge(base, patch, where: str):
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for field, value in patch.items():
        if field.startswith("$"):
            problem(f"{where}: the fallback renderer does not support the directive {field}")
            continue
        if value is None:
            merged.pop(field, None)
        elif field not in merged:
            merged[field] = copy.deepcopy(value)
        elif isinstance(value, list) and isinstance(merged[field], list):
            merged[field] = merge_list(field, merged[field], value, where)
        else:
            merged[field] = strategic_merge(merged[field], value, f"{where}.{field}")
    return merged


def merge_list(field: str, base: list, patch: list, where: str) -> list:
    items = base + patch
    key = merge_key(field, items) if all(isinstance(i, dict) for i in items) else None
    if key is None:
        return copy.deepcopy(patch)
    patch_keys = [item.get(key) for item in patch]
    if len(set(map(str, patch_keys))) != len(patch_keys):
        problem(f"{where}.{field}: the patch lists the same {key} twice")
    merged = copy.deepcopy(base)
    for item in patch:
        index = next((n for n, b in enumerate(merged) if b.get(key) == item.get(key)), None)
        if index is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[index] = strategic_merge(merged[index], item, f"{where}.{field}[{item.get(key)}]")
    return merged


def render_fallback(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for field in set(kustomization) - {"apiVersion", "kind", "resources", "patches"}:
        problem(f"{rel(directory)}: the fallback renderer does not support `{field}`")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render_fallback(path) if path.is_dir() else docs(path)
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            problem(f"{rel(directory)}: the fallback renderer supports patches given by `path` only")
            continue
        for patch in docs(directory / entry["path"]):
            matches = [
                n
                for n, r in enumerate(resources)
                if (r["apiVersion"], r["kind"], r["metadata"]["name"])
                == (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
            ]
            if len(matches) != 1:
                problem(f"{rel(directory)}/{entry['path']}: patches {ident(patch)}, found {len(matches)} times")
                continue
            resources[matches[0]] = strategic_merge(resources[matches[0]], patch, ident(patch))
    return resources


def render_kustomize(command: list[str], directory: Path) -> list[dict] | None:
    done = subprocess.run(command + [str(directory)], capture_output=True, text=True)
    if done.returncode != 0:
        problem(f"{rel(directory)}: {' '.join(command)} failed: {done.stderr.strip()}")
        return None
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def canonical(value):
    """Order-free form for comparing renders: resources by kind/name, lists
    of objects sorted (scalar lists such as args keep their order)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        if all(isinstance(i, dict) for i in items):
            items.sort(key=lambda i: json.dumps(i, sort_keys=True))
        return items
    return value


# ---------------------------------------------------------------- schemas


def validate_schemas(label: str, resources: list[dict], versions: list[str]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    for resource in resources:
        for version in versions:
            where = f"{label}: {ident(resource)} against Kubernetes {version}"
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problem(f"{where}: {path}: {e.message}")
            except SchemaNotFoundError as e:
                problem(f"{where}: {e.message}")
            except Exception as e:  # noqa: BLE001 - any other failure is a failed check too
                problem(f"{where}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- strata keys


def known_keys() -> set[str]:
    text = (ROOT / "src/config/keys.rs").read_text()
    names = set(re.findall(r'^\s*"([A-Za-z0-9.\-]+)"\s*=>', text, re.M))
    aliases = re.search(r"const ALIASES[^=]*=\s*&\[(.*?)\];", text, re.S)
    if aliases:
        names |= set(re.findall(r'\(\s*"([^"]+)"\s*,', aliases.group(1)))
    if len(names) < 20:
        problem("src/config/keys.rs: found fewer than 20 key names; has the keys! table changed form?")
    return names


def parse_flat(text: str, where: str) -> dict[str, str]:
    """Flink's flat `key: value` YAML, as src/config/source.rs reads it."""
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        content = line.rstrip()
        if not content.strip() or content.strip().startswith("#"):
            continue
        if content != content.lstrip() or content.startswith("-") or ":" not in content:
            problem(f"{where}:{number}: not a flat `key: value` line: {content!r}")
            continue
        key, value = content.split(":", 1)
        value = re.split(r"\s#", value.strip(), maxsplit=1)[0].strip().strip("'\"")
        entries[key.strip()] = value
    return entries


def flatten_toml(table: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            flat.update(flatten_toml(value, key))
        else:
            flat[key] = value
    return flat


def dash_d(args: list[str]) -> dict[str, str]:
    """The `-D key=value` pairs of an argument list (`-D k=v` or `-Dk=v`)."""
    found = {}
    for n, arg in enumerate(args):
        pair = args[n + 1] if arg == "-D" and n + 1 < len(args) else arg[2:] if arg.startswith("-D") else None
        if pair is not None and "=" in pair:
            key, value = pair.split("=", 1)
            found[key.strip()] = value.strip()
    return found


def check_keys(keys: set[str], used: dict[str, str], where: str) -> int:
    for key in used:
        if key not in keys:
            problem(f"{where}: `{key}` is not a strata configuration key (src/config/keys.rs)")
    return len(used)


# ---------------------------------------------------------------- wiring


def rest_routes() -> list[re.Pattern]:
    text = (ROOT / "src/web/mod.rs").read_text()
    routes = re.findall(r'\.route\("([^"]+)"', text)
    return [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", r) + "$") for r in routes]


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_wiring(label: str, resources: list[dict], keys: set[str], routes) -> int:
    """Returns the number of strata keys it checked."""
    by_kind = {}
    for r in resources:
        by_kind.setdefault(r["kind"], {})[r["metadata"]["name"]] = r
    configmaps = by_kind.get("ConfigMap", {})
    services = by_kind.get("Service", {})
    checked = 0
    for cm in configmaps.values():
        for name, text in (cm.get("data") or {}).items():
            if name.endswith((".yaml", ".yml")):
                entries = parse_flat(text, f"{label}: {ident(cm)} {name}")
                checked += check_keys(keys, entries, f"{label}: {ident(cm)} {name}")
    jobmanager_rpc = []
    taskmanager_dials = []
    for deployment in list(by_kind.get("Deployment", {}).values()) + list(by_kind.get("StatefulSet", {}).values()):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            where = f"{label}: {ident(deployment)} container {c['name']}"
            args = c.get("args", [])
            role = args[0] if args else None
            if role not in ("jobmanager", "taskmanager"):
                continue
            env = {e["name"]: e for e in c.get("env", [])}
            # The effective configuration, in strata's order: file < STRATA_PROPERTIES < -D.
            config: dict[str, str] = {}
            if "-c" in args:
                config_path = args[args.index("-c") + 1]
                mount = next((m for m in c.get("volumeMounts", []) if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
                source = volumes.get(mount["name"], {}).get("configMap") if mount else None
                item = config_path[len(mount["mountPath"].rstrip("/")) + 1 :] if mount else None
                data = configmaps.get(source["name"], {}).get("data", {}) if source else {}
                if item not in data:
                    problem(f"{where}: -c {config_path} is not a key of a mounted ConfigMap")
                else:
                    config.update(parse_flat(data[item], f"{where} {config_path}"))
            if "STRATA_PROPERTIES" in env:
                properties = parse_flat(env["STRATA_PROPERTIES"].get("value", ""), f"{where} STRATA_PROPERTIES")
                checked += check_keys(keys, properties, f"{where} STRATA_PROPERTIES")
                config.update(properties)
            overrides = dash_d(args)
            checked += check_keys(keys, overrides, f"{where} -D")
            config.update(overrides)

            if "STRATA_AUTH_SECRET" not in env and "security.auth.secret-file" not in config:
                problem(f"{where}: no cluster secret (STRATA_AUTH_SECRET or security.auth.secret-file); strata refuses non-loopback addresses without one")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}

            def port_is(port_name: str, key: str) -> None:
                if str(ports.get(port_name)) != str(config.get(key)):
                    problem(f"{where}: container port `{port_name}` is {ports.get(port_name)} but {key} is {config.get(key)}")

            if role == "jobmanager":
                port_is("rpc", "jobmanager.rpc.port")
                port_is("rest", "rest.port")
                port_is("flight", "jobmanager.flight.port")
                if "--bind" in args:
                    bind_port = args[args.index("--bind") + 1].rsplit(":", 1)[-1]
                    if bind_port != str(ports.get("rpc")):
                        problem(f"{where}: --bind port {bind_port} is not the `rpc` container port {ports.get('rpc')}")
                jobmanager_rpc.append((deployment, ports.get("rpc")))
            else:
                port_is("data", "taskmanager.data.port")
                port_is("flight", "taskmanager.flight.port")
                host = config.get("taskmanager.host", "")
                pod_ip = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if host != "$(POD_IP)" or pod_ip != "status.podIP":
                    problem(f"{where}: taskmanager.host must be the pod IP ($(POD_IP) from status.podIP), is {host!r}")
                dial = args[args.index("--jobmanager") + 1] if "--jobmanager" in args else (
                    f"{config.get('jobmanager.rpc.address')}:{config.get('jobmanager.rpc.port')}")
                taskmanager_dials.append((where, dial))

            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket") or {}
                port = action.get("port")
                if isinstance(port, str) and port not in ports:
                    problem(f"{where}: {probe_name} names port `{port}`, which the container does not have")
                if "httpGet" in probe:
                    if role != "jobmanager":
                        problem(f"{where}: {probe_name} is HTTP, but only the JobManager serves HTTP")
                    elif port not in ("rest", config.get("rest.port")):
                        problem(f"{where}: {probe_name} is HTTP on `{port}`, not the REST port")
                    path = probe["httpGet"].get("path", "/")
                    if not any(r.match(path) for r in routes):
                        problem(f"{where}: {probe_name} path {path} is not a REST route of src/web/mod.rs")

            # Everything strata writes must be on a writable volume when the
            # root file system is read-only.
            if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                writable = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
                written = [("execution.checkpointing.dir", config.get("execution.checkpointing.dir", "/tmp/strata-checkpoints"))]
                if role == "taskmanager":
                    dirs = re.split(r"[,:]", config.get("io.tmp.dirs", "/tmp"))
                    written += [("io.tmp.dirs", d.strip()) for d in dirs if d.strip()]
                if "STRATA_KERNEL_CACHE" in env:
                    written.append(("STRATA_KERNEL_CACHE", env["STRATA_KERNEL_CACHE"].get("value", "")))
                for what, path in written:
                    if not under(path, writable):
                        problem(f"{where}: {what} {path} is not on a writable volume (readOnlyRootFilesystem)")

    for where, dial in taskmanager_dials:
        host, _, port = dial.rpartition(":")
        service = services.get(host)
        if service is None:
            problem(f"{where}: dials the JobManager at {dial}, but there is no Service {host}")
            continue
        service_port = next((p for p in service["spec"]["ports"] if str(p["port"]) == port), None)
        if service_port is None:
            problem(f"{where}: Service {host} has no port {port}")
            continue
        selected = [
            (d, rpc) for d, rpc in jobmanager_rpc
            if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
        ]
        target = service_port.get("targetPort", service_port["port"])
        if len(selected) != 1 or target not in ("rpc", selected[0][1]):
            problem(f"{where}: Service {host} port {port} does not lead to exactly one JobManager's rpc port")
    return checked


# ---------------------------------------------------------------- strata config

QUANTITY_MIB = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}


def mebibytes(quantity: str) -> int | None:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", str(quantity))
    return int(int(match.group(1)) * QUANTITY_MIB[match.group(2)]) if match else None


def strata_config(binary: str, args: list[str], env: dict[str, str], where: str) -> None:
    """Loads a configuration the way a command would (`strata config`), so
    that values are checked too, not only key names."""
    environment = {"PATH": "/usr/bin:/bin", **env}
    done = subprocess.run([binary, "config", *args], capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        problem(f"{where}: `strata config {' '.join(args)}` refused it: {done.stderr.strip()}")


def check_with_strata(binary: str, label: str, resources: list[dict], scratch: Path) -> int:
    """Runs each strata container's configuration through the real parser,
    with the downward-API variables replaced by what the kubelet would give."""
    configmaps = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ConfigMap"}
    count = 0
    for deployment in (r for r in resources if r["kind"] in ("Deployment", "StatefulSet")):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            args = list(c.get("args", []))
            if not args or args[0] not in ("jobmanager", "taskmanager"):
                continue
            where = f"{label}: {ident(deployment)} container {c['name']}"
            values = {"POD_IP": "127.0.0.1"}
            memory = mebibytes(c.get("resources", {}).get("limits", {}).get("memory", ""))
            if memory is not None:
                values["MEMORY_LIMIT_MB"] = str(memory)
            args = [re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), a) for a in args]
            options = []
            n = 1
            while n < len(args):
                if args[n] == "-c":
                    path = args[n + 1]
                    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
                    data = configmaps[volumes[mount["name"]]["configMap"]["name"]]["data"]
                    local = scratch / label.replace("/", "_") / c["name"] / Path(path).name
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_text(data[path[len(mount["mountPath"].rstrip("/")) + 1 :]])
                    options += ["-c", str(local)]
                    n += 2
                elif args[n] == "-D":
                    options += args[n : n + 2]
                    n += 2
                else:
                    n += 2 if args[n].startswith("--") else 1
            env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e and e["name"].startswith("STRATA_PROPERTIES")}
            strata_config(binary, options, env, where)
            count += 1
    return count


# ---------------------------------------------------------------- systemd, Dockerfile


def check_systemd(keys: set[str]) -> int:
    checked = 0
    toml_path = SYSTEMD / "strata.toml"
    config = flatten_toml(tomllib.loads(toml_path.read_text()))
    checked += check_keys(keys, config, rel(toml_path))
    env_path = SYSTEMD / "strata.env"
    env = {}
    for line in env_path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    for name, value in env.items():
        if name == "STRATA_PROPERTIES":
            checked += check_keys(keys, parse_flat(value, f"{rel(env_path)} {name}"), f"{rel(env_path)} {name}")
        else:
            checked += check_keys(keys, dash_d(shlex.split(value)), f"{rel(env_path)} {name}")
    for unit in sorted(SYSTEMD.glob("*.service")):
        text = unit.read_text()
        settings: dict[str, list[str]] = {}
        for line in text.splitlines():
            if "=" in line and not line.lstrip().startswith(("#", ";")):
                name, _, value = line.partition("=")
                settings.setdefault(name.strip(), []).append(value.strip())
        for exec_start in settings.get("ExecStart", []):
            args = shlex.split(exec_start)
            checked += check_keys(keys, dash_d(args), f"{rel(unit)} ExecStart")
            if "-c" not in args or args[args.index("-c") + 1] != "/etc/strata/strata.toml":
                problem(f"{rel(unit)}: ExecStart does not read -c /etc/strata/strata.toml")
        writable = [p.lstrip("-") for v in settings.get("ReadWritePaths", []) for p in v.split()]
        writable += ["/var/lib/" + d for v in settings.get("StateDirectory", []) for d in v.split()]
        if "taskmanager" in unit.name:
            for d in config.get("io.tmp.dirs", []):
                if not under(d, writable):
                    problem(f"{rel(unit)}: io.tmp.dirs {d} (strata.toml) is not writable under ProtectSystem=strict")
        checkpoint_dir = str(config.get("execution.checkpointing.dir", ""))
        if not under(checkpoint_dir, writable):
            problem(f"{rel(unit)}: execution.checkpointing.dir {checkpoint_dir} (strata.toml) is not writable under ProtectSystem=strict")
    return checked


def dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


def check_dockerfile() -> list[str]:
    """Parses the Dockerfile with BuildKit's own parser (the `dockerfile`
    package wraps it) and checks what a build would trip over, since no
    container engine may be there to build it."""
    import dockerfile

    try:
        commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    except dockerfile.GoParseError as e:
        problem(f"Dockerfile: does not parse: {e}")
        return []
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    global_args: set[str] = set()
    stages: list[tuple[str, list]] = []
    needed: set[str] = set()
    for c in commands:
        where = f"Dockerfile:{c.start_line}"
        if c.cmd not in INSTRUCTIONS:
            problem(f"{where}: unknown instruction {c.cmd}")
        if c.cmd == "FROM":
            base, name = c.value[0], c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else ""
            variable = re.fullmatch(r"\$\{?(\w+)\}?", base)
            if variable and variable.group(1) not in global_args:
                problem(f"{where}: FROM {base}: no ARG {variable.group(1)} before the first FROM")
            if not variable and ":" not in base and base not in [n for n, _ in stages]:
                problem(f"{where}: FROM {base} is neither an earlier stage nor a tagged image")
            stages.append((name, []))
            continue
        if not stages:
            if c.cmd == "ARG":
                global_args.add(c.value[0].split("=", 1)[0])
            continue
        stages[-1][1].append(c)
        flags = dict(f.lstrip("-").split("=", 1) for f in c.flags if "=" in f)
        if c.cmd in ("COPY", "ADD"):
            if "from" in flags:
                if flags["from"] not in [n for n, _ in stages[:-1]]:
                    problem(f"{where}: COPY --from={flags['from']} names no earlier stage")
            else:
                needed |= {v for v in c.value[:-1] if v != "."}
        if c.cmd == "RUN":
            for flag in c.flags:
                mount = dict(p.split("=", 1) for p in flag.removeprefix("--mount=").split(",") if "=" in p)
                if flag.startswith("--mount=") and mount.get("type") == "bind" and "from" not in mount:
                    needed.add(mount.get("source", "."))
    names = [name for name, _ in stages]
    for target in ("runtime", "rdma", "gpu", "gpu-rdma"):
        if target not in names:
            problem(f"Dockerfile: no `{target}` target")
    if names and names[-1] != "runtime":
        problem("Dockerfile: the last stage (what a plain `docker build` makes) is not `runtime`")
    for name, body in stages:
        entrypoints = [c for c in body if c.cmd == "ENTRYPOINT"]
        if not entrypoints:
            continue
        users = [c.value[0] for c in body if c.cmd == "USER"]
        if not users or not users[-1].split(":")[0] == "10001":
            problem(f"Dockerfile: stage {name} has an entrypoint but does not run as uid 10001")
        entry = entrypoints[-1]
        if not entry.json or entry.value[-1] != "/usr/local/bin/strata":
            problem(f"Dockerfile: stage {name}'s entrypoint is not the exec form ending in /usr/local/bin/strata")
    for path in sorted(needed):
        if not (ROOT / path).exists():
            problem(f"Dockerfile: needs {path}, which does not exist")
        elif dockerignored(path, patterns):
            problem(f"Dockerfile: needs {path}, which .dockerignore leaves out of the context")
    for path in ("Cargo.toml", "Cargo.lock", "src", "ffi", "kernels", "benches", "examples"):
        if dockerignored(path, patterns):
            problem(f".dockerignore leaves out {path}, which cargo build needs")
    return names


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kustomize", default="", help="command that renders a kustomization directory, e.g. 'kubectl kustomize'")
    parser.add_argument("--k8s-versions", default="1.32.0 1.37.0")
    parser.add_argument("--strata", default="", help="a strata binary: also load every configuration with `strata config`")
    args = parser.parse_args()
    versions = args.k8s_versions.split()
    kustomize = shlex.split(args.kustomize)

    import kubernetes_validate.version

    keys = known_keys()
    routes = rest_routes()
    directories = [KUBE / "base"] + sorted(p.parent for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
    rendered_by = " ".join(kustomize) if kustomize else "the fallback renderer (no kustomize)"
    print(f"kubernetes-validate {kubernetes_validate.version.__version__}, strict, Kubernetes {', '.join(versions)}; rendered by {rendered_by}")
    resource_count = 0
    keys_checked = 0
    loaded = 0
    scratch = Path(tempfile.mkdtemp(prefix="strata-deploy-"))
    for directory in directories:
        label = rel(directory)
        before = len(problems)
        fallback = render_fallback(directory)
        resources = fallback
        if kustomize:
            official = render_kustomize(kustomize, directory)
            if official is not None:
                resources = official
                if sorted(map(canonical, official), key=ident) != sorted(map(canonical, fallback), key=ident):
                    problem(f"{label}: the fallback renderer's output differs from {rendered_by}'s")
        validate_schemas(label, resources, versions)
        keys_checked += check_wiring(label, resources, keys, routes)
        if args.strata:
            loaded += check_with_strata(args.strata, label, resources, scratch)
        resource_count += len(resources)
        verdict = "ok" if len(problems) == before else f"{len(problems) - before} problems"
        print(f"  {label}: {len(resources)} resources ({', '.join(ident(r) for r in resources)}): {verdict}")
    for example in sorted(KUBE.rglob("*.example.yaml")):
        before = len(problems)
        resources = docs(example)
        validate_schemas(rel(example), resources, versions)
        resource_count += len(resources)
        verdict = "ok" if len(problems) == before else f"{len(problems) - before} problems"
        print(f"  {rel(example)}: {len(resources)} resource ({', '.join(ident(r) for r in resources)}): {verdict}")
    before = len(problems)
    keys_checked += check_systemd(keys)
    print(f"strata keys: {keys_checked} uses in the manifests and deploy/systemd checked against {len(keys)} known keys: "
          + ("ok" if len(problems) == before else "problems"))
    if args.strata:
        toml_path = SYSTEMD / "strata.toml"
        env_args = ""
        for line in (SYSTEMD / "strata.env").read_text().splitlines():
            if line.startswith("STRATA_TASKMANAGER_ARGS="):
                env_args = line.partition("=")[2]
        strata_config(args.strata, ["-c", str(toml_path), *shlex.split(env_args)], {}, rel(toml_path))
        loaded += 1
        print(f"strata config ({args.strata}): {loaded} configurations loaded: " + ("ok" if not problems else "problems"))
    else:
        print("strata config: skipped (no strata binary; `cargo build` first, or STRATA_BIN=path)")
    shutil.rmtree(scratch, ignore_errors=True)
    before = len(problems)
    stages = check_dockerfile()
    print(f"Dockerfile: stages {', '.join(stages)}: " + ("ok" if len(problems) == before else "problems"))
    if problems:
        print(f"\n{len(problems)} problems in deploy/:", file=sys.stderr)
        for text in problems:
            print(f"  {text}", file=sys.stderr)
        return 1
    print(f"{resource_count} Kubernetes resources valid; {len(directories)} kustomizations rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
