"""Run storage addressed by a URI: a local path, a shared-filesystem path, `s3://`, `gs://`, or any
pyarrow/fsspec filesystem.

Every node of a multi-node run writes into `run.output_dir` (Ray Train checkpoints, Ray Data outputs), so it
must be storage all of them see. `check_visible_from_all_nodes` proves that before any expensive work.

S3 settings come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION); an S3-compatible server (MinIO, Ceph, moto) is named by
S3RAY_S3_ENDPOINT or AWS_ENDPOINT_URL, e.g. `http://127.0.0.1:9000`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Object stores make a whole object appear at once when its upload completes, so a direct write is already
# atomic there; a "move" would be a copy plus delete (slower and not atomic).
_OBJECT_STORES = ("s3", "gs", "gcs")
ENDPOINT_VARS = ("S3RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL")
# Variables a Ray job needs on every node to reach the same storage (credentials stay each node's own).
STORAGE_ENV_VARS = (*ENDPOINT_VARS, "AWS_REGION", "AWS_DEFAULT_REGION")


class StorageError(OSError):
    """Run storage that cannot be used as configured."""


def scheme(uri: str) -> str:
    """The URI's scheme ('' for a plain local path)."""
    parsed = urlparse(str(uri))
    # A Windows drive letter parses as a one-letter scheme; treat it as a path.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_local(uri: str) -> bool:
    """Whether `uri` names a path on this machine's filesystem (which may still be a shared mount)."""
    return scheme(uri) in ("", "file")


def absolute_output_dir(uri: str) -> str:
    """`uri` with a relative or `~` local path made absolute; other URIs unchanged.

    Call it once on the driver at start: under `ray job submit --working-dir` a relative path lands in a
    temporary copy of the working dir that Ray deletes when the job ends."""
    if not is_local(uri):
        return str(uri)
    path = urlparse(str(uri)).path if scheme(uri) == "file" else str(uri)
    return str(Path(path).expanduser().absolute())


def node_local_on_multinode(uri: str, alive_nodes: int) -> bool:
    """Whether `uri` is a local path while the Ray cluster has more than one node: then it is only usable if
    it is a shared mount at the same path everywhere, which `check_visible_from_all_nodes` finds out."""
    return is_local(uri) and alive_nodes > 1


def s3_endpoint() -> str | None:
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def _s3_filesystem(endpoint: str) -> pafs.S3FileSystem:
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parsed.netloc:
        raise StorageError(f"S3 endpoint {endpoint!r} (S3RAY_S3_ENDPOINT / AWS_ENDPOINT_URL) has no host; "
                           "write it as http://HOST:PORT or https://HOST")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pafs.S3FileSystem(
        endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"), secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"), allow_bucket_creation=True,
    )


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec  # only for schemes pyarrow lacks (memory://, az://, ...); ships with Ray Data's deps

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `uri`. Local paths expand `~` and become absolute in the process
    that resolves them: on another node that is that node's own disk."""
    kind = scheme(uri)
    if kind in ("", "file"):
        return pafs.LocalFileSystem(), absolute_output_dir(uri)
    if kind == "s3" and s3_endpoint():
        parsed = urlparse(uri)
        return _s3_filesystem(s3_endpoint()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        return _fsspec_filesystem(uri)
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri`/part/... for paths and URIs alike."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def _fsync_local(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(uri: str, write) -> None:
    """Run `write(fs, path)` so readers see the whole file or none: write a unique temp name, then move."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if scheme(uri) in _OBJECT_STORES:
        write(fs, path)
        return
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex}"
    try:
        write(fs, tmp)
        if isinstance(fs, pafs.LocalFileSystem):
            _fsync_local(tmp)  # the data reaches the disk before the name does
        fs.move(tmp, path)
        if isinstance(fs, pafs.LocalFileSystem):
            _fsync_local(parent, directory=True)  # and the new name survives a crash
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    def put(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    _atomic(uri, put)


def write_parquet(uri: str, table: pa.Table) -> None:
    _atomic(uri, lambda fs, path: pq.write_table(table, path, filesystem=fs))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_parquet(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(uri: str) -> int | None:
    """The size in bytes of the file at `uri` (None when there is none)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def list_dir(uri: str, recursive: bool = False) -> list[str]:
    """Paths below `uri`, relative to it, sorted ([] when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted(i.path[len(path):].lstrip("/") for i in infos)


def delete(uri: str) -> None:
    """Delete the file at `uri` (nothing to do when there is none)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def replace_local_dir(src: str | Path, dest: str | Path) -> Path:
    """Copy folder `src` over `dest` on a local disk: a complete, fsynced copy under a temp name first, then a
    rename, so `dest` is never a half-copied folder (at worst briefly absent, which resume re-runs)."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    try:
        shutil.copytree(src, tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_local(str(f))
        _fsync_local(str(tmp), directory=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_local(str(dest.parent), directory=True)
    return dest


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder (model weights, a checkpoint) to `uri`."""
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"{src} is not a folder; nothing to upload to {uri}")
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src.absolute()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, cache_dir: str | Path) -> Path:
    """A local copy of the folder at `uri` under `cache_dir` (reused when already complete).

    The copy lands in a temp folder first and is renamed when whole, so a failed download is never reused."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"{uri} is not a folder (or is not visible from here); cannot download it")
    dest = Path(cache_dir) / path.strip("/").replace("/", "__")
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)  # copy_files makes sub-folders, not always the top one
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return publish_local_dir(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # else another process on this node finished the same download first
            raise StorageError(f"downloading {uri} to {dest} failed: {exc}") from exc
    return dest


def publish_local_dir(tmp: Path, dest: Path, marker: str | None = None) -> Path:
    """Move a finished `tmp` folder to `dest` in one rename, so a half-written folder is never mistaken for a
    finished one. Several processes on one node may build the same folder at once: if another published `dest`
    first (it is a folder, holding `marker` if given), keep theirs and drop ours."""
    try:
        os.rename(tmp, dest)
    except OSError:
        published = (dest / marker).is_file() if marker else dest.is_dir()
        if not published:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file or folder to `uri` (a folder replaces what was there)."""
    local = Path(local)
    fs, path = resolve(uri)
    if local.is_dir():
        delete_dir(uri)
        upload_dir(local, uri)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local.absolute()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(uri: str, local: str | Path) -> bool:
    """Copy the file or folder at `uri` over `local`, whole or not at all; False when `uri` has nothing."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return False
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex}")
    if kind == pafs.FileType.Directory:
        tmp.mkdir()  # copy_files makes sub-folders, not always the top one
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if kind == pafs.FileType.Directory:
            replace_local_dir(tmp, local)
        else:
            os.replace(tmp, local)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return True


def _node_probe(uri: str, token: str, node_id: str) -> str | None:
    """On one node: read the driver's marker, write this node's answer. None, or what went wrong."""
    marker = join(uri, ".s3ray-visibility", token)
    try:
        if read_bytes(join(marker, "driver")) != token.encode():
            return "sees a different marker file"
        write_bytes(join(marker, f"node-{node_id}"), token.encode())
    except (OSError, pa.ArrowException) as exc:
        return f"cannot read or write it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


def _probe_nodes(nodes: list[dict], uri: str, token: str, timeout_s: float) -> list[str | None]:
    """Each node's `_node_probe` answer; a task that fails or does not finish in time is an answer too."""
    import ray  # lazy: storage is also used without Ray (reports, local runs)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(uri, token, n["NodeID"]) for n in nodes]
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    answers: list[str | None] = []
    for ref in refs:
        if ref not in ready:
            answers.append(f"did not answer within {timeout_s:g} s")
            continue
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayError as exc:
            answers.append(f"its probe task failed: {str(exc).strip().splitlines()[-1][:200]}")
    return answers


SHARED_STORAGE_FIX = ("set run.output_dir to a shared filesystem mounted at the same path on every node "
                      "(NFS, EFS, Filestore), or to an object store URI such as s3://BUCKET/runs/NAME "
                      "(S3-compatible servers: set S3RAY_S3_ENDPOINT).")


def check_visible_from_all_nodes(uri: str, timeout_s: float = 120.0, fix: str = SHARED_STORAGE_FIX) -> None:
    """Prove every alive Ray node reads and writes the same storage at `uri`: the driver writes a marker, a
    task pinned to each node reads it and writes one back, and the driver reads those back.
    Raises StorageError naming the nodes that cannot see it, and `fix`. Ray must be initialised."""
    import ray  # lazy: storage is also used without Ray (reports, local runs)

    token = uuid.uuid4().hex
    marker = join(uri, ".s3ray-visibility", token)
    write_bytes(join(marker, "driver"), token.encode())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    bad = {}
    try:
        for node, answer in zip(nodes, _probe_nodes(nodes, uri, token, timeout_s)):
            if answer is None and not exists(join(marker, f"node-{node['NodeID']}")):
                answer = "wrote its answer where the driver cannot see it"
            if answer is not None:
                bad[node["NodeID"]] = f"{node.get('NodeManagerAddress')} ({node['NodeID'][:12]}): {answer}"
    finally:
        delete_dir(marker)
    if bad:
        raise StorageError(
            f"run.output_dir {uri} is not the same storage on every Ray node; {len(bad)} of {len(nodes)} "
            f"node(s) cannot see what the driver wrote there:\n  " + "\n  ".join(bad.values()) +
            "\nFix: " + fix
        )
