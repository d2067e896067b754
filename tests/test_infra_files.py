"""The compose stack and the Kubernetes project carry what their consumers require.

Docker and Kubernetes do not run here, so these tests parse the files and check them with
the code that will consume them where it can run: MLflow's project loader, its click parser
for `mlflow server`, its auth-config reader, its Kubernetes job-definition code (loaded from
its source without the `kubernetes` package), and the analysis' own study lookup.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import tomllib
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
FULL_ENV = {name: f"test-{name.lower()}" for name in SECRETS}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# --- docker compose ------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(KeyError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, $$."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        unset_or_empty = value is None or value == ""
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(replace, text)


def compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), FULL_ENV if env is None else env))


def test_compose_has_the_four_services_with_healthchecks_and_ordered_start():
    services = compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    init_script = " ".join(services["minio-init"]["command"])
    bucket = services["minio-init"]["environment"]["MLFLOW_BUCKET"]
    assert "mc mb --ignore-existing" in init_script and "${MLFLOW_BUCKET}" in init_script
    assert bucket == "ecg-mlflow"


def test_every_published_port_binds_loopback_unless_overridden():
    for env, expected in ((FULL_ENV, "127.0.0.1"), ({**FULL_ENV, "ECG_MLFLOW_BIND_ADDRESS": "10.1.2.3"}, "10.1.2.3")):
        published = [p for s in compose(env)["services"].values() for p in s.get("ports", [])]
        assert len(published) == 4  # postgres, minio api + console, mlflow
        for port in published:
            assert port.split(":")[0] == expected, port


@pytest.mark.parametrize("secret", SECRETS)
def test_every_secret_is_required_and_has_no_default(secret):
    raw = COMPOSE.read_text()
    uses = re.findall(r"(?<!\$)\$\{" + secret + r"([^}]*)\}", raw)  # $${X}: the container's shell
    assert uses, f"{secret} is not used"
    assert all(use.startswith(":?") for use in uses), f"{secret} has a default or is optional: {uses}"
    env = {k: v for k, v in FULL_ENV.items() if k != secret}
    with pytest.raises(MissingVariable, match=secret):
        compose(env)
    with pytest.raises(MissingVariable, match=secret):
        compose({**env, secret: ""})


def test_mlflow_server_command_parses_with_mlflow_own_cli():
    from mlflow.cli import server

    service = compose()["services"]["mlflow"]
    command = service["command"]
    assert command[:2] == ["mlflow", "server"]
    params = server.make_context("server", list(command[2:])).params
    assert params["backend_store_uri"] == "postgresql+psycopg2://mlflow:test-postgres_password@postgres:5432/mlflow"
    assert params["artifacts_destination"] == "s3://ecg-mlflow/"
    assert params["serve_artifacts"] is True
    assert params["app_name"] == "basic-auth"
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)  # inside the container only
    assert service["ports"] == ["127.0.0.1:5000:5000"]


def test_mlflow_service_disables_jobs_and_passes_auth_settings_mlflow_reads(monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION,
    )

    env = compose()["services"]["mlflow"]["environment"]
    monkeypatch.setenv(MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name, env[MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name])
    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get() is False
    assert env[MLFLOW_AUTH_ADMIN_PASSWORD.name] == FULL_ENV["MLFLOW_ADMIN_PASSWORD"]
    assert env[MLFLOW_FLASK_SERVER_SECRET_KEY.name] == FULL_ENV["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"] == FULL_ENV["MINIO_ROOT_PASSWORD"]


def test_server_image_pins_the_project_versions():
    dockerfile = (INFRA / "mlflow-server" / "Dockerfile").read_text()
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    for package in ("mlflow", "psycopg2-binary", "boto3"):
        pin = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert re.search(rf"{re.escape(package)}(\[[a-z,]+\])?=={re.escape(pin)}", dockerfile), package
    assert '"mlflow[auth]==3.17.2"' in dockerfile  # Flask-WTF: basic-auth refuses to start without it
    assert re.search(r"^FROM python:3\.11[\w.-]*-slim", dockerfile, re.M)
    build = compose()["services"]["mlflow"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).is_file()


def test_env_example_lists_every_variable_with_no_secret_filled_in():
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert referenced <= set(example), f"missing from .env.example: {sorted(referenced - set(example))}"
    for secret in SECRETS:
        assert example[secret] == "", secret
    assert example["ECG_MLFLOW_BIND_ADDRESS"] == "127.0.0.1"


def test_entrypoint_writes_an_auth_config_mlflow_reads(tmp_path, monkeypatch):
    import mlflow.server

    # mlflow.server.auth's __init__ needs Flask-WTF (the image's mlflow[auth]); its config
    # reader does not, so load that file alone.
    auth_config = load_module(Path(mlflow.server.__file__).parent / "auth" / "config.py", "mlflow_auth_config")
    read_auth_config = auth_config.read_auth_config
    entrypoint = load_module(INFRA / "mlflow-server" / "entrypoint.py", "mlflow_entrypoint")
    ini = tmp_path / "basic_auth.ini"
    uri = "postgresql+psycopg2://mlflow:p%40ss%25word@postgres:5432/mlflow_auth"
    entrypoint.write_auth_config(str(ini), uri)
    assert oct(ini.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    config = read_auth_config()
    assert config.database_uri == uri
    assert (config.admin_username, config.admin_password) == ("admin", "from-the-environment")
    assert config.default_permission == "READ"


def test_entrypoint_refuses_to_start_without_passwords(monkeypatch):
    entrypoint = load_module(INFRA / "mlflow-server" / "entrypoint.py", "mlflow_entrypoint")
    for name in entrypoint.REQUIRED:
        monkeypatch.setenv(name, "x")
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
    with pytest.raises(SystemExit, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        entrypoint.require_env()


# --- Kubernetes ----------------------------------------------------------------------------


def load_projects():
    from mlflow.projects._project_spec import load_project

    return load_project(str(K8S)), load_project(str(PROJECT_ROOT))


def mlflow_kubernetes_functions() -> dict:
    """`_get_kubernetes_job_definition` and `_get_run_command` from MLflow's own source.

    mlflow/projects/kubernetes.py imports the `kubernetes` and `docker` packages at the top,
    which the project does not install; these two functions use neither.
    """
    import mlflow.projects

    source = Path(mlflow.projects.__file__).with_name("kubernetes.py").read_text()
    wanted = {"_get_kubernetes_job_definition", "_get_run_command"}
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in tree.body} == wanted
    namespace = {"os": os, "datetime": datetime, "quote": shlex.quote, "split": shlex.split,
                 "_logger": logging.getLogger("mlflow.projects.kubernetes")}
    exec(compile(tree, "mlflow/projects/kubernetes.py", "exec"), namespace)
    return namespace


def test_k8s_project_is_docker_env_and_mirrors_the_main_entry_point():
    k8s, root = load_projects()
    assert k8s.docker_env["image"]
    k8s_main, root_main = k8s.get_entry_point("main"), root.get_entry_point("main")
    assert set(k8s_main.parameters) == set(root_main.parameters) - {"head_config"}
    assert k8s_main.command == root_main.command.replace(" --head-config {head_config}", "")
    for param in ("arch", "seed", "data", "weights", "image_height", "image_width", "split", "crop",
                  "learning_rate", "batch_size", "max_epochs", "patience", "dense_units", "dropout", "cache_dir"):
        option = "--" + param.replace("_", "-")
        assert f"{option} {{{param}}}" in k8s_main.command, param


def test_k8s_command_options_exist_on_the_train_command():
    from ecg_mlflow.commands.train import train

    options = {opt for p in train.params for opt in p.opts}
    k8s, _ = load_projects()
    used = re.findall(r"(--[a-z-]+) \{", k8s.get_entry_point("main").command)
    assert used and set(used) <= options, set(used) - options


def test_k8s_defaults_survive_mlflows_requoting():
    """The Kubernetes backend re-quotes every word for an exec without a shell: a word that
    needs quoting (an empty value, a space) would reach the program with its quotes."""
    k8s, _ = load_projects()
    command = k8s.get_entry_point("main").compute_command({}, None)
    words = mlflow_kubernetes_functions()["_get_run_command"]([command])
    assert words == shlex.split(command)
    assert "" not in words


def test_backend_config_is_accepted_by_mlflow(monkeypatch):
    from mlflow.projects import _parse_kubernetes_config

    raw = json.loads((K8S / "kubernetes_config.json").read_text())
    assert {"kube-context", "repository-uri", "kube-job-template-path"} <= set(raw)
    monkeypatch.chdir(PROJECT_ROOT)  # the template path is relative to where `mlflow run` runs
    parsed = _parse_kubernetes_config(raw)
    assert parsed["kube-job-template"]["kind"] == "Job"


def test_job_template_becomes_a_job_that_reaches_the_server_through_the_secret(monkeypatch):
    """Fill the template with MLflow's own code, as `mlflow run --backend kubernetes` does."""
    submit_grid = load_module(K8S / "submit_grid.py", "submit_grid")
    template = yaml.safe_load((K8S / "kubernetes_job_template.yaml").read_text())
    container = template["spec"]["template"]["spec"]["containers"][0]
    assert template["metadata"]["name"] == "{replaced with MLflow Project name}"
    assert container["name"] == "{replaced with MLflow Project name}"
    assert container["image"] == "{replaced with URI of Docker image created during Project execution}"
    assert container["command"] == ["{replaced with MLflow Project entry point command}"]
    assert template["metadata"]["namespace"]
    assert template["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert template["spec"]["backoffLimit"] == 0

    k8s, _ = load_projects()
    command = k8s.get_entry_point("main").compute_command({"arch": "vgg16", "seed": "3"}, None)
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", submit_grid.IN_CLUSTER_TRACKING_URI)
    env_vars = {"MLFLOW_RUN_ID": "abc", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_ID": "1"}
    mlflow_code = mlflow_kubernetes_functions()
    job = mlflow_code["_get_kubernetes_job_definition"](
        k8s.name, "registry.example.org/ecg:abc", "sha256:0", mlflow_code["_get_run_command"]([command]),
        env_vars, template,
    )
    assert DNS_LABEL.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    filled = job["spec"]["template"]["spec"]["containers"][0]
    assert DNS_LABEL.match(filled["name"])
    assert filled["command"][:5] == ["python", "-m", "ecg_mlflow", "train", "--arch"]
    env = [e["name"] for e in filled["env"]]
    by_name = {e["name"]: e for e in filled["env"]}
    # $(ECG_MLFLOW_TRACKING_URI) expands only from a variable defined earlier in the list.
    assert by_name["MLFLOW_TRACKING_URI"]["value"] == "$(ECG_MLFLOW_TRACKING_URI)"
    assert env.index("ECG_MLFLOW_TRACKING_URI") < env.index("MLFLOW_TRACKING_URI")
    for name, key in (("ECG_MLFLOW_TRACKING_URI", "tracking-uri"), ("MLFLOW_TRACKING_USERNAME", "username"),
                      ("MLFLOW_TRACKING_PASSWORD", "password")):
        assert by_name[name]["valueFrom"]["secretKeyRef"] == {"name": "ecg-mlflow-tracking", "key": key}
    assert env.count("MLFLOW_TRACKING_URI") == 1


def test_job_mounts_the_data_and_cache_the_defaults_point_at():
    k8s, _ = load_projects()
    params = k8s.get_entry_point("main").parameters
    spec = yaml.safe_load((K8S / "kubernetes_job_template.yaml").read_text())["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert claims == {"data": "ecg-data", "cache": "ecg-cache"}
    assert mounts["/data"]["readOnly"] is True and mounts["/data"]["name"] == "data"
    assert params["data"].default.startswith("/data/")
    assert params["cache_dir"].default.startswith("/cache/") and mounts["/cache"]["name"] == "cache"


def test_k8s_dockerfile_installs_the_project():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    for path in ("pyproject.toml", "ecg_mlflow", "analysis"):
        assert re.search(rf"^COPY .*\b{path}\b", dockerfile, re.M), path
        assert (PROJECT_ROOT / path).exists()
    # the project with a Keras backend: TensorFlow comes only with an extra
    install = re.search(r"^RUN pip install '?\.\[([a-z,-]+)\]'?", dockerfile, re.M)
    assert install and "cpu" in install.group(1).split(","), "the image must install the `cpu` extra (TensorFlow)"
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorflow") for req in extras["cpu"])
    assert re.search(r"^USER (?!root)", dockerfile, re.M)


# --- the grid fan-out ----------------------------------------------------------------------


@pytest.fixture()
def submit_grid():
    return load_module(K8S / "submit_grid.py", "submit_grid")


def test_grid_arguments_are_checked_with_one_clear_error(submit_grid):
    assert submit_grid.parse_seeds("7,1-3") == (1, 2, 3, 7)
    assert submit_grid.parse_archs("resnet50, efficientnetv2s") == ("resnet50", "efficientnetv2s")
    with pytest.raises(submit_grid.GridError, match="--seeds must look like 1-10"):
        submit_grid.parse_seeds("1,x")
    with pytest.raises(submit_grid.GridError, match="--archs must be distinct backbones.*'resnet5'"):
        submit_grid.parse_archs("resnet5")
    with pytest.raises(submit_grid.GridError, match="-P seed: set by the grid"):
        submit_grid.parse_params(["seed=3"])
    with pytest.raises(submit_grid.GridError, match="-P head_config: not a parameter"):
        submit_grid.parse_params(["head_config=x.json"])
    with pytest.raises(submit_grid.GridError, match="-P weights: empty value"):
        submit_grid.parse_params(["weights="])
    assert submit_grid.parse_params(["weights=none", "split=grouped"]) == {"weights": "none", "split": "grouped"}


def test_grid_is_seed_major_and_names_runs_like_train(submit_grid):
    from ecg_mlflow.config import TrainConfig
    from ecg_mlflow.train import run_name

    cells = submit_grid.plan_grid(("resnet50", "vgg16"), (1, 2))
    assert [(c.arch, c.seed) for c in cells] == [("resnet50", 1), ("vgg16", 1), ("resnet50", 2), ("vgg16", 2)]
    assert cells[1].run_name == run_name(TrainConfig(arch="vgg16", seed=1))
    assert cells[0].parameters({"weights": "none"}) == {"weights": "none", "arch": "resnet50", "seed": "1"}


def test_study_parent_and_tagged_children_are_what_the_analysis_reads(submit_grid, tracking_uri):
    from mlflow import MlflowClient

    from analysis.gather import find_study_run, parse_seed_spec, study_archs
    from ecg_mlflow import schema

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(schema.DEFAULT_EXPERIMENT)
    archs, seeds = ("resnet50", "efficientnetv2s"), (1, 2, 3)
    study_id = submit_grid.create_study_run(client, experiment_id, archs, seeds, {"weights": "none"})
    study = find_study_run(client, experiment_id, "latest")
    assert study.info.run_id == study_id
    assert study_archs(study) == archs
    assert parse_seed_spec(study.data.params["seeds"]) == seeds
    assert study.data.params["weights"] == "none"

    child = client.create_run(experiment_id, run_name="resnet50-s1").info.run_id
    submit_grid.tag_child(client, child, study_id)
    found = client.search_runs(
        [experiment_id],
        f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_TRAIN}' and tags.`{schema.TAG_STUDY}` = '{study_id}'",
    )
    assert [r.info.run_id for r in found] == [child]
    assert found[0].data.tags["mlflow.parentRunId"] == study_id


def test_dry_run_prints_one_submission_per_cell_and_touches_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(K8S / "submit_grid.py"), "--archs", "resnet50,vgg16", "--seeds", "1-2",
         "-P", "weights=none", "--dry-run"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'must-not-exist.db'}"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert all("--backend kubernetes" in line and "-P weights=none" in line for line in lines)
    assert "-P arch=vgg16 -P seed=2" in lines[3] and "--run-name vgg16-s2" in lines[3]
    assert lines[0].startswith("KUBE_MLFLOW_TRACKING_URI='$(ECG_MLFLOW_TRACKING_URI)' mlflow run infra/k8s")
    assert not (tmp_path / "must-not-exist.db").exists()


def test_submission_without_the_kubernetes_client_fails_before_creating_runs(tmp_path):
    db = tmp_path / "mlflow.db"
    result = subprocess.run(
        [sys.executable, str(K8S / "submit_grid.py"), "--archs", "resnet50,vgg16", "--seeds", "1"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
    )
    if importlib.util.find_spec("kubernetes") and importlib.util.find_spec("docker"):
        pytest.skip("the kubernetes and docker packages are installed here")
    assert result.returncode == 2
    assert result.stderr.startswith("submit_grid: the kubernetes backend needs the Python package(s)")
    assert not db.exists()


# --- system packages -----------------------------------------------------------------------


def test_install_system_deps_check_agrees_with_dpkg():
    """`--check` installs nothing and reports exactly the packages dpkg lacks."""
    script = INFRA / "install-system-deps"
    if not Path("/usr/bin/dpkg-query").exists():
        pytest.skip("not a Debian machine (no dpkg-query)")
    packages = ("postgresql-15", "postgresql-client-15", "chromium", "chromium-driver")
    assert all(p in script.read_text() for p in packages)
    missing = [
        p for p in packages
        if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout
        != "install ok installed"
    ]
    result = subprocess.run([str(script), "--check"], capture_output=True, text=True, timeout=60)
    if missing:
        assert result.returncode == 1
        assert result.stdout.strip() == f"system deps missing: {' '.join(missing)}"
    else:
        assert result.returncode == 0 and "all present" in result.stdout


# --- the sharded feature pass --------------------------------------------------------------


@pytest.fixture()
def submit_features():
    return load_module(K8S / "submit_features.py", "submit_features")


def pod_command(job: dict, index: int) -> list[str]:
    """The command one pod runs: Kubernetes expands $(SHARD_INDEX) from the container's env."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    return [word.replace("$(SHARD_INDEX)", str(index)) for word in container["command"]]


def test_features_job_is_an_indexed_job_whose_pods_cover_every_shard_once(submit_features):
    from ecg_mlflow.commands.features import features
    from ecg_mlflow.config import parse_shard

    params = submit_features.parse_params(["weights=none", "cache_dir=s3://ecg-mlflow/features"], "resnet50")
    job = submit_features.render_job("resnet50", 4, 3, params, "registry.example.org/ecg:1")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert DNS_LABEL.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 3)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["image"] == "registry.example.org/ecg:1"
    env = [e["name"] for e in container["env"]]
    by_name = {e["name"]: e for e in container["env"]}
    assert by_name["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env.count("SHARD_INDEX") == 1
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert by_name[name]["valueFrom"]["secretKeyRef"]["optional"] is True  # a PVC cache needs none
    shards = []
    for index in range(4):
        words = pod_command(job, index)
        assert words[:4] == ["python", "-m", "ecg_mlflow", "features"]
        parsed = features.make_context("features", words[4:]).params  # the real command's parser
        shards.append(parse_shard(parsed["shard"]))
        assert (parsed["arch"], parsed["weights"], parsed["cache_dir"]) == ("resnet50", "none", "s3://ecg-mlflow/features")
        assert parsed["data"] == "/data/ecg-images"
    assert shards == [(i, 4) for i in range(4)]


def test_features_job_mounts_what_the_training_jobs_mount(submit_features):
    job = submit_features.render_job("vgg16", 2, 2, submit_features.parse_params([], "vgg16"), "img")
    train_job = yaml.safe_load((K8S / "kubernetes_job_template.yaml").read_text())
    train = train_job["spec"]["template"]["spec"]
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == train["volumes"]
    assert pod["containers"][0]["volumeMounts"] == train["containers"][0]["volumeMounts"]
    assert pod["securityContext"] == train["securityContext"]
    assert "--cache-dir" in pod_command(job, 0) and "/cache/features" in pod_command(job, 0)
    assert job["spec"]["parallelism"] == 2 and job["metadata"]["namespace"] == train_job["metadata"]["namespace"]


def test_features_job_arguments_fail_with_one_line_before_anything_is_submitted(submit_features):
    with pytest.raises(submit_features.FeaturesJobError, match="-P seed: not an option of `features`"):
        submit_features.parse_params(["seed=1"], "resnet50")
    with pytest.raises(submit_features.FeaturesJobError, match="-P image_height must be an integer"):
        submit_features.parse_params(["image_height=abc"], "resnet50")
    with pytest.raises(submit_features.FeaturesJobError, match="-P cache_dir must be a folder or an s3://"):
        submit_features.parse_params(["cache_dir=gs://b/x"], "resnet50")
    with pytest.raises(submit_features.FeaturesJobError, match="--arch must be one of"):
        submit_features.parse_arch("resnet5")
    result = subprocess.run(
        [sys.executable, str(K8S / "submit_features.py"), "--arch", "resnet50", "--shards", "0"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 2 and result.stderr == "submit_features: --shards must lie in 1..10000, got 0\n"


def test_features_job_prints_yaml_kubernetes_reads():
    result = subprocess.run(
        [sys.executable, str(K8S / "submit_features.py"), "--arch", "vgg16", "--shards", "3", "-P", "weights=none"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    assert "--shard" in pod_command(job, 2) and "2/3" in pod_command(job, 2)
