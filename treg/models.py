"""Model specs to ``(model, tokenizer)``, and the weights hashes that cache keys use.

A model spec is what a recipe's ``model_name_or_path``, ``--model``, ``--judge`` or ``critic_model`` holds:

    treg:tiny              the embedded tiny model (built once, cached; :mod:`treg.synthetic`)
    ./runs/my-dpo          a local folder in Hugging Face format
    org/name               a hub id (from the local hub cache when ``HF_HUB_OFFLINE=1``)

Every room that loads weights calls :func:`load_causal_lm`, so a spec means the same thing everywhere.

Under DeepSpeed ZeRO-3 each process holds a slice of every parameter; :func:`is_partitioned` tells, and
:func:`full_tensors` walks the whole tensors one at a time. :func:`weights_hash` hashes them, the same for a
partitioned and a whole model, so cache entries are shared whatever the number of processes or ZeRO stage.
"""

from __future__ import annotations

import hashlib
import os

import torch

TINY_MODEL_SPEC = "treg:tiny"


def load_causal_lm(
    spec: str,
    *,
    dtype=None,
    device=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    inference: bool = False,
    **model_kwargs,
):
    """``(model, tokenizer)`` for a model spec (see the module docstring).

    ``dtype`` (a ``torch.dtype`` or ``"auto"``) and ``model_kwargs`` (e.g. ``attn_implementation``) go to
    ``from_pretrained``; they do not apply to ``treg:tiny``, which is float32. ``device`` moves the model there.
    A tokenizer without a pad token gets its eos token as pad token (batched scoring and generation need one).
    ``inference=True`` is for judges and evaluation: the checkpoint's own dtype (``"auto"``) unless ``dtype`` says
    otherwise, the GPU when there is one (unless ``device`` says otherwise), eval mode, no progress bars.
    """
    if inference:
        dtype = "auto" if dtype is None else dtype
        device = default_device() if device is None else device
        show_progress = False
    if spec == TINY_MODEL_SPEC:
        from treg.synthetic import load_tiny_model

        model, tokenizer, _ = load_tiny_model(show_progress=show_progress)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
        model.config.name_or_path = spec
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    if inference:
        model.eval()
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    """For a local checkpoint folder, (file, size, mtime) of its weight files, so a retrained checkpoint at the same
    path changes a cache key; None for hub ids and the embedded models."""
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
