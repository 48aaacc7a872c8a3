"""Cluster manifests: the launcher YAML against Ray's own schema, the KubeRay manifests against the CRDs'
openAPIV3Schema, and the resources they provide against what the run config asks for. No Ray is started."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from s3ray import storage
from s3ray.config import S3Config, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# Attention heads and KV heads of the teacher models the GPU configs name (from each model's config.json):
# tensor parallelism splits both, so the TP size must divide both.
KNOWN_HEADS = {"Qwen/Qwen2.5-7B-Instruct": (28, 4), "meta-llama/Llama-3.1-8B-Instruct": (32, 8)}


# The CRDs are 1-1.5 MB of YAML: libyaml reads them in a second or two, pure Python in ten times that.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_LOADER)  # a safe loader (C or Python)


def _strict(schema):
    """The CRD schema as JSON Schema that rejects unknown fields: the API server would silently prune them,
    so a misspelt field would be lost without a word."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(name: str) -> jsonschema.Draft7Validator:
    crd = _yaml(CLUSTER / "kuberay" / "crds" / f"ray.io_{name}.yaml")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


LAUNCHER = _yaml(CLUSTER / "gpu-cluster.yaml")
RAYCLUSTER = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
RAYJOB = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
JOB_ENV = _yaml(REPO / "jobs" / "runtime_env.yaml")


def _job_config() -> tuple[Path, S3Config]:
    args = RAYJOB["spec"]["entrypoint"].split()
    assert args[:2] == ["python", "jobs/s3_job.py"], "the RayJob runs the S3 job entry point"
    assert (REPO / args[1]).is_file()
    return REPO / args[2], load_config(REPO / args[2])


def fit_problems(cfg: S3Config, node_gpus: list[int]) -> list[str]:
    """Why GPU nodes with `node_gpus` GPUs each cannot hold the run `cfg` asks for ([] when they can).
    A teacher replica's TP x PP GPUs sit on one node (a STRICT_PACK placement group); replicas and student
    workers (one GPU each) are all up at once, since the teacher pool stays up while the student trains."""
    t, s = cfg.teacher, cfg.student
    world = t.tensor_parallel_size * t.pipeline_parallel_size
    student = s.num_workers if s.use_gpu else 0
    problems = []
    if not node_gpus or max(node_gpus) < world:
        problems.append(f"a teacher replica needs {world} GPUs on one node; the largest node has "
                        f"{max(node_gpus, default=0)}")
    placed = sum(g // world for g in node_gpus)
    if placed < t.replicas:
        problems.append(f"{t.replicas} teacher replicas of {world} GPUs fit {placed} on these nodes")
    if sum(node_gpus) < t.replicas * world + student:
        problems.append(f"{t.replicas} x {world} teacher GPUs + {student} student GPUs > {sum(node_gpus)} GPUs")
    return problems


def _launcher_node_gpus() -> list[int]:
    types = LAUNCHER["available_node_types"]
    return [int(n.get("resources", {}).get("GPU", 0)) for n in types.values() for _ in range(n.get("min_workers", 0))]


def _kuberay_node_gpus() -> list[int]:
    gpus = []
    for group in RAYCLUSTER["spec"]["workerGroupSpecs"]:
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        gpus += [int(container["resources"]["limits"].get("nvidia.com/gpu", 0))] * group["minReplicas"]
    return gpus


def test_the_launcher_yaml_validates_against_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(LAUNCHER, schema)
    broken = copy.deepcopy(LAUNCHER)
    broken["docker"]["imgae"] = broken["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="imgae"):
        jsonschema.validate(broken, schema)


def test_the_launcher_ships_source_only_and_keeps_work_off_the_head():
    assert {".venv", "runs", ".git"} <= set(LAUNCHER["rsync_exclude"])
    head = LAUNCHER["available_node_types"][LAUNCHER["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--head" in c and "--num-cpus=0" in c for c in LAUNCHER["head_start_ray_commands"])
    assert any("VENV=system bash scripts/install.sh gpu" in c for c in LAUNCHER["setup_commands"])


def _image_versions(image: str) -> tuple[str, str]:
    """(Ray version, python tag) from a `...:X.Y.Z-pyNNN-gpu`-style tag."""
    m = re.search(r"(?:ray)?(\d+\.\d+\.\d+)-(py3\d+)-gpu$", image)
    assert m, f"{image}: name the Ray version and Python in the tag (e.g. rayproject/ray:2.60.0-py311-gpu)"
    return m.group(1), m.group(2)


def test_every_image_runs_the_drivers_ray_version_on_a_gpu_build():
    base = LAUNCHER["docker"]["image"]
    assert base.startswith("rayproject/ray")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {base}\n" in dockerfile, "the KubeRay image is built on the launcher's Ray image"
    pods = [RAYCLUSTER["spec"]["headGroupSpec"]] + RAYCLUSTER["spec"]["workerGroupSpecs"]
    images = {base} | {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    for image in images:
        assert _image_versions(image)[0] == ray.__version__
    assert len({_image_versions(i) for i in images}) == 1
    assert RAYCLUSTER["spec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("kind,doc", [("rayclusters", RAYCLUSTER), ("rayjobs", RAYJOB)])
def test_kuberay_manifests_validate_against_the_crd_schema(kind, doc):
    validator = crd_validator(kind)
    assert _errors(validator, doc) == []
    typo = copy.deepcopy(doc)
    typo["spec"]["shutdownAfterJobFinish"] = True  # the real field ends in "Finishes"
    assert any("shutdownAfterJobFinish" in e for e in _errors(validator, typo))


def test_the_rayjob_targets_the_raycluster_and_ships_what_jobs_ship():
    assert RAYJOB["spec"]["clusterSelector"] == {"ray.io/cluster": RAYCLUSTER["metadata"]["name"]}
    env = yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])
    assert env["excludes"] == JOB_ENV["excludes"]
    assert {".venv", "runs", ".git"} <= set(JOB_ENV["excludes"])
    assert RAYCLUSTER["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_gpu_config_writes_to_storage_every_node_sees_and_splits_its_teacher_evenly():
    _, cfg = _job_config()
    assert not storage.is_local(cfg.run.output_dir), "a multi-node run needs shared run storage"
    assert cfg.ray.address == "auto"
    heads, kv_heads = KNOWN_HEADS[cfg.teacher.model]
    assert heads % cfg.teacher.tensor_parallel_size == 0 and kv_heads % cfg.teacher.tensor_parallel_size == 0
    assert cfg.teacher.use_gpu and cfg.student.use_gpu


@pytest.mark.parametrize("source", ["launcher", "kuberay"])
def test_the_manifests_provide_the_gpus_the_run_config_asks_for(source):
    _, cfg = _job_config()
    node_gpus = _launcher_node_gpus() if source == "launcher" else _kuberay_node_gpus()
    assert node_gpus and all(g > 0 for g in node_gpus)
    assert fit_problems(cfg, node_gpus) == []


def test_the_fit_check_rejects_a_cluster_too_small_for_the_config():
    _, cfg = _job_config()
    assert fit_problems(cfg, [8]) != []  # one node: 16 GPUs asked for
    wide = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"tensor_parallel_size": 16})})
    assert any("on one node" in p for p in fit_problems(wide, [8, 8, 8]))
    assert any("fit 5" in p for p in fit_problems(cfg, [8, 3]))  # 4 + 1 replicas of 2 GPUs
