"""Cluster deployment files and job entrypoints: fast checks, no cloud credentials, no new cluster.

- cluster.yaml through the launcher's own validation (what `ray up` runs before any cloud call);
- the KubeRay manifests (deploy/kuberay/) for the fields KubeRay needs, their embedded Serve
  config against Ray Serve's schema and raykd's app arguments, their entrypoint against the repo;
- jobs/*.py: argument parsing and failure exit codes;
- raykd.cluster.runtime: cluster detection and the placement summary (on the session's local Ray).

The multi-node runs are scripts (each starts its own cluster): tests/multinode/run.sh.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raykd.cluster.needs import DRIVER_RESOURCE
from raykd.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"


def _cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _launcher_validate(config: dict) -> dict:
    """What `ray up` does with the file before it talks to the cloud: fill defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_passes_the_launchers_schema_validation():
    prepared = _launcher_validate(_cluster_yaml())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "fractional_resource", "min_over_max"])
def test_the_validation_would_catch_a_broken_cluster_yaml(breakage):
    import jsonschema

    config = _cluster_yaml()
    if breakage == "unknown_top_level_key":
        config["max_worker"] = 3  # typo of max_workers
    elif breakage == "fractional_resource":
        config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5
    else:
        config["available_node_types"]["worker.cpu"]["min_workers"] = 100
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_validate(config)


def test_cluster_yaml_node_types_fit_the_stages():
    config = _cluster_yaml()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 100, "Tune trial drivers need the zero-CPU resource"
    assert "GPU" not in head["resources"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU") and t["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu, "a GPU worker type (Train, soft labels, serving) and a CPU one (Ray Data)"
    for t in workers.values():
        assert t["min_workers"] == 0 < t["max_workers"], "worker types autoscale from zero"
        # a node type's own worker_setup_commands would replace the common ones (raykd's install)
        assert "worker_setup_commands" not in t


def test_cluster_yaml_installs_raykd_and_turns_on_token_auth():
    config = _cluster_yaml()
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    raykd_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/raykd" in c)
    assert torch_at < raykd_at, "torch before raykd, or pip pulls the CUDA build everywhere"
    assert any("ray[" in c and "==2.60.0" in c for c in setup)
    assert config["file_mounts"]["~/raykd"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any("/mnt/shared" in c for c in config["initialization_commands"]), "shared storage for run dirs"
    assert "**/runs/**" in config["rsync_exclude"]


# ---------------------------------------------------------------- KubeRay manifests

def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, tune_drivers: bool) -> dict[str, str]:
    """The RayClusterSpec fields KubeRay needs; returns {volume mount path: claim name}."""
    assert str(spec["rayVersion"]).startswith("2.60"), "the Ray of the image and of the clients"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    groups = [("head", head), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]
    mounts = {}
    for name, group in groups:
        params = group["rayStartParams"]
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), \
            f"{name}: rayStartParams values must be strings"
        containers = _containers(group["template"])
        assert containers and all(c.get("image") and c.get("name") for c in containers)
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in group["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        for m in containers[0].get("volumeMounts", []):
            if m["name"] in claims:  # shared storage; other mounts (the API-key Secret) are not PVCs
                mounts[m["mountPath"]] = claims[m["name"]]
    if tune_drivers:  # KubeRay passes the string on to `ray start --resources=...`
        resources = json.loads(head["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
        assert resources[DRIVER_RESOURCE] >= 100, "Tune trial drivers need the zero-CPU resource"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} cannot scale"
    return mounts


def test_rayjob_manifest():
    job = _manifest("rayjob-pipeline.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    mounts = _check_ray_cluster_spec(spec["rayClusterSpec"], tune_drivers=True)
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = _containers(groups["gpu"]["template"])[0]["resources"]["limits"]
    assert str(gpu["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in _containers(groups["cpu"]["template"])[0]["resources"]["limits"]
    assert set(mounts.values()) == {_manifest("shared-pvc.yaml")["metadata"]["name"]}


def test_rayjob_entrypoint_is_a_job_of_this_repo_with_a_valid_config():
    spec = _manifest("rayjob-pipeline.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[2] == "--config"
    # the image holds the repo at /app (deploy/kuberay/Dockerfile)
    script, config = (REPO / Path(a).relative_to("/app") for a in (argv[1], argv[3]))
    assert script.is_file() and script.parent.name == "jobs"
    cfg = load_config(config, argv[4:])
    assert Path(cfg.output_dir).is_absolute()
    mounts = _check_ray_cluster_spec(spec["rayClusterSpec"], tune_drivers=True)
    assert any(Path(cfg.output_dir).is_relative_to(m) for m in mounts), "output_dir on the shared volume"
    assert cfg.teacher.train.use_gpu and cfg.distill.train.use_gpu and cfg.soft_labels.use_gpu


def test_dockerfile_installs_what_the_manifests_run():
    text = (KUBERAY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-" in text
    for path in ("raykd", "jobs", "configs"):
        assert f" {path} /app/{path}" in text
    assert text.index("torch==") < text.index("pip install --no-cache-dir -e /app")


def test_rayservice_manifest_and_its_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raykd.serve.app import AppArgs

    svc = _manifest("rayservice-student.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService" and svc["metadata"]["name"]
    spec = svc["spec"]
    mounts = _check_ray_cluster_spec(spec["rayClusterConfig"], tune_drivers=False)
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` and KubeRay submit
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    (app,) = serve_config["applications"]
    assert app["import_path"] == "raykd.serve:app_builder"
    working_dir = (app.get("runtime_env") or {}).get("working_dir")
    assert working_dir is None or "://" in working_dir, "Serve configs need a URI working_dir"
    args = AppArgs.model_validate(app["args"])
    assert args.max_replicas > args.min_replicas >= 1, "the student autoscales"
    assert any(Path(args.path).is_relative_to(m) for m in mounts)
    job_cfg = load_config(REPO / "configs/quickstart.yaml",
                          shlex.split(_manifest("rayjob-pipeline.yaml")["spec"]["entrypoint"])[4:])
    assert args.path == job_cfg.output_dir, "the service serves what the RayJob wrote"


# ---------------------------------------------------------------- jobs/

def _job(stage: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{stage}.py"), *argv], check=False, cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})})


def test_every_stage_has_a_job_entrypoint_of_the_same_name():
    from raykd import cli, jobs, stages

    names = [s.name for s in stages.STAGES] + list(jobs.OTHER_JOBS)
    assert {p.stem for p in (REPO / "jobs").glob("*.py")} == set(names) | set(cli.TOOLS)
    for stage in names:
        assert f'main("{stage}")' in (REPO / "jobs" / f"{stage}.py").read_text()
    commands = set(cli._parser()._subparsers._group_actions[0].choices)
    assert set(names) - {"serve"} <= commands  # the CLI's stage commands carry the same names


def test_job_with_a_bad_config_key_exits_1_with_the_message_on_stderr():
    out = _job("teacher", "--config", "configs/quickstart.yaml", "teacher.train.bogus=1")
    assert out.returncode == 1
    assert "unknown key 'teacher.train.bogus'" in out.stderr and "jobs/teacher.py: error" in out.stderr


def test_job_without_config_exits_2_with_usage():
    out = _job("pipeline", "output_dir=/tmp/x")
    assert out.returncode == 2
    assert "usage: jobs/pipeline.py" in out.stderr and "--config" in out.stderr


def test_job_with_a_missing_config_file_exits_1():
    out = _job("prepare", "--config", "configs/nope.yaml")
    assert out.returncode == 1 and "config file not found: configs/nope.yaml" in out.stderr


def test_job_refuses_a_relative_output_dir_inside_a_ray_job(capsys, monkeypatch):
    from raykd import jobs

    monkeypatch.setenv(jobs.IN_RAY_JOB_ENV, "{}")
    assert jobs.main("prepare", ["--config", "configs/quickstart.yaml", "output_dir=runs/x"]) == 1
    err = capsys.readouterr().err
    assert "output_dir 'runs/x' is relative" in err and "output_dir=/mnt/shared" in err
    monkeypatch.delenv(jobs.IN_RAY_JOB_ENV)
    assert jobs.run_directory("runs/x") == (Path.cwd() / "runs/x").resolve()  # fine outside a job
    assert jobs.main("prepare", ["--config", "configs/quickstart.yaml", "output_dir=s3://bucket/runs/x"]) == 1
    assert "cloud storage is not supported" in capsys.readouterr().err


def test_serve_job_arguments():
    from raykd import jobs

    args = jobs.parser("serve").parse_args(["--config", "c.yaml", "--path", "/r", "--block", "serve.port=9000"])
    assert (args.config, args.path, args.block, args.overrides) == ("c.yaml", "/r", True, ["serve.port=9000"])
    with pytest.raises(SystemExit):
        jobs.parser("teacher").parse_args(["--config", "c.yaml", "--path", "/r"])


def test_jobs_take_the_cli_output_flags():
    from raykd import jobs
    from raykd.core import console

    assert jobs.parser("pipeline").parse_args(["--config", "c.yaml", "-q", "seed=1"]).quiet
    assert jobs.tool_parser("recommend").parse_args(["/r", "--out", "/o.parquet", "-v"]).verbose
    with pytest.raises(SystemExit):
        jobs.parser("teacher").parse_args(["--config", "c.yaml", "-q", "-v"])
    try:
        assert jobs.main("prepare", ["--config", "configs/quickstart.yaml", "-v", "output_dir=s3://b/x"]) == 1
        assert console.level() == console.VERBOSE
    finally:
        console.set_level(console.NORMAL)


# ---------------------------------------------------------------- runtime: finding a cluster, placement

def test_find_cluster_order(monkeypatch):
    from raykd.cluster.runtime import find_cluster
    from raykd.config import RayConfig

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert find_cluster(RayConfig()) == "10.0.0.1:6379"
    assert find_cluster(RayConfig(address="10.0.0.2:6379")) == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert find_cluster(RayConfig(num_cpus=2)) is None  # num_cpus: a local Ray of that size


def test_placement_summary_and_warnings(ray_session, capsys):
    from raykd import stages
    from raykd.cluster.placement import describe_placement
    from raykd.cluster.storage import check_shared_storage

    ok = load_config("configs/quickstart.yaml", ["tune.enabled=false"])
    assert describe_placement(ok, stages.needs(ok)) == []
    out = capsys.readouterr().out
    assert "teacher: 1 run, each one Ray task on 1 CPU (no Ray Train start)" in out
    ddp = load_config("configs/quickstart.yaml", ["tune.enabled=false", "teacher.train.num_workers=2",
                                                  "teacher.train.cpus_per_worker=0.5"])
    assert describe_placement(ddp, stages.needs(ddp, ["teacher"])) == []
    assert "teacher: 1 run, each 2 Train worker(s) x 0.5 CPU (gloo DDP)" in capsys.readouterr().out
    assert "soft_labels: 1 Ray Data actor(s) x 1 CPU" in out and "tune" not in out

    too_many = load_config("configs/quickstart.yaml", ["teacher.train.num_workers=3", "distill.train.use_gpu=true",
                                                       "soft_labels.num_workers=4"])
    warnings = describe_placement(too_many, stages.needs(too_many), quiet=True)
    assert any("teacher training needs 3 CPU" in w and "teacher.train" in w for w in warnings)
    assert any("distill training needs a GPU" in w for w in warnings)
    assert any(w.startswith("soft_labels needs 4 CPU") for w in warnings)
    big_worker = load_config("configs/quickstart.yaml", ["teacher.train.cpus_per_worker=8"])
    big_needs = stages.needs(big_worker, ["teacher"])
    assert any("largest node has 2" in w for w in describe_placement(big_worker, big_needs, quiet=True))
    check_shared_storage("/nonexistent-but-single-node")  # one node: nothing to check


# ---------------------------------------------------------------- multi-node (opt-in here; CI runs the script)

@pytest.mark.skipif(not os.environ.get("RAYKD_MULTINODE"),
                    reason="multi-node runs take minutes and start their own clusters: tests/multinode/run.sh "
                           "(or RAYKD_MULTINODE=1)")
@pytest.mark.parametrize("script", ["cluster_utils_distill.py", "ray_start_job.py"])
def test_multinode(script):
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multinode" / script)], check=False, cwd=REPO,
                         timeout=2400)
    assert out.returncode == 0
