"""Checkpoints stored as what training changed over a packaged backbone, and their rebuilding.

A delta folder holds ``config.json``, the tokenizer files, ``delta.safetensors`` (every tensor
that differs from the backbone, in float16 by default) and ``capplug-delta.json``, which names the
backbone and says which tensors to take from it unchanged. Rebuilding writes a complete
checkpoint once into the cache; the delta's sha256 names the cache entry, so a new delta never
reuses an old rebuild.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from capplug._cache import cache_home, lock_for, sha256_file, staging_dir, write_json_atomic
from capplug.errors import CheckpointError

DELTA_MANIFEST = "capplug-delta.json"
DELTA_WEIGHTS = "delta.safetensors"
_FULL_WEIGHTS = "model.safetensors"  # a whole checkpoint, as save_pretrained writes it
_COPIED = ("config.json", "README.md")
# Training never changes the tokenizer: the rebuilt checkpoint takes the backbone's own files.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def is_delta(folder: Path) -> bool:
    """A stored delta (manifest and changed tensors), not a checkpoint rebuilt from one."""
    return (
        (folder / DELTA_MANIFEST).is_file()
        and (folder / DELTA_WEIGHTS).is_file()
        and not (folder / _FULL_WEIGHTS).is_file()
    )


def export_delta(
    trained: str | Path,
    out: str | Path,
    *,
    base: str = "minilm",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``trained`` (a full checkpoint folder) as a delta over the packaged ``base``."""
    from capplug.models import resolve

    trained, out = Path(trained), Path(out)
    state = load_file(trained / _FULL_WEIGHTS)
    base_folder = resolve(base)
    base_state = load_file(base_folder / _FULL_WEIGHTS)
    from_base: dict[str, str] = {}
    delta: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _base_key(key, base_state)
        if match is not None and torch.equal(base_state[match].to(tensor.dtype), tensor):
            from_base[key] = match
        else:
            delta[key] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
    with staging_dir(out) as tmp:
        save_file(delta, tmp / DELTA_WEIGHTS)
        for name in _COPIED:
            if (trained / name).is_file():
                shutil.copy2(trained / name, tmp / name)
        write_json_atomic(
            tmp / DELTA_MANIFEST,
            {
                "base": base,
                "base_sha256": sha256_file(base_folder / _FULL_WEIGHTS),
                "from_base": from_base,
                "delta_sha256": sha256_file(tmp / DELTA_WEIGHTS),
                "delta_dtype": str(dtype).removeprefix("torch."),
            },
        )
    return out


def materialize(folder: Path, name: str) -> Path:
    """Rebuild a full checkpoint from a delta folder once, into the cache, and return its folder."""
    from capplug.models import resolve

    manifest = json.loads((folder / DELTA_MANIFEST).read_text())
    final = cache_home() / "models" / f"{name}-{manifest['delta_sha256'][:12]}"
    if _complete(final) and not _stale_files(folder, final):
        return final
    with lock_for(f"delta-{final.name}"):
        if _complete(final):
            # Same weights; a changed config (new selection weights, say) is copied over.
            for item in _stale_files(folder, final):
                tmp = final / f".{item.name}.tmp"
                shutil.copy2(item, tmp)
                os.replace(tmp, final / item.name)
            return final
        if sha256_file(folder / DELTA_WEIGHTS) != manifest["delta_sha256"]:
            raise CheckpointError(
                f"{folder / DELTA_WEIGHTS} is damaged (sha256 mismatch); reinstall capplug"
            )
        base_folder = resolve(manifest["base"])
        base_state = load_file(base_folder / _FULL_WEIGHTS)
        delta = load_file(folder / DELTA_WEIGHTS)
        state: dict[str, torch.Tensor] = {}
        for key, base_key in manifest["from_base"].items():
            if base_key not in base_state:
                raise CheckpointError(
                    f"backbone {manifest['base']} lacks tensor {base_key} that {name} needs"
                )
            state[key] = base_state[base_key]
        for key, tensor in delta.items():
            state[key] = tensor.float() if tensor.is_floating_point() else tensor
        with staging_dir(final) as tmp:
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                tmp / _FULL_WEIGHTS,
                metadata={"format": "pt"},
            )
            for name in _TOKENIZER_FILES:
                if (base_folder / name).is_file():
                    shutil.copy2(base_folder / name, tmp / name)
            for item in folder.iterdir():
                if item.name != DELTA_WEIGHTS and item.is_file():
                    shutil.copy2(item, tmp / item.name)
    return final


def _complete(final: Path) -> bool:
    return (final / _FULL_WEIGHTS).is_file() and (final / DELTA_MANIFEST).is_file()


def _stale_files(folder: Path, final: Path) -> list[Path]:
    """The delta folder's small files (config, card) that the rebuilt folder lacks or differs in."""
    return [
        item
        for item in folder.iterdir()
        if item.name != DELTA_WEIGHTS
        and item.is_file()
        and (
            not (final / item.name).is_file()
            or (final / item.name).read_bytes() != item.read_bytes()
        )
    ]


def _base_key(key: str, base_state: dict[str, torch.Tensor]) -> str | None:
    if key in base_state:
        return key
    # A task head wraps the backbone under a prefix such as "bert." or "roberta.".
    _, _, rest = key.partition(".")
    return rest if rest in base_state else None
