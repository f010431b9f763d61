"""Benchmark assets and data paths.

Assets (judge prompts, annotator configs, the data manifest ``data.yaml``) are the repository's top-level ``eval/``,
installed with treg as the package ``treg._eval`` and found through it (:func:`assets_dir`), so a wheel install has
them as well as a checkout.

Data files: the manifest names each file relative to a data root; the root is the first of the manifest's ``roots``
that has the file. A root is ``${VAR}`` (an environment variable, skipped when unset), ``package:PATH`` (relative to
the assets package) or a path, relative to the current working directory when not absolute. Explicit paths (the
``--reference-outputs``, ``--questions``, ``--baseline-answers`` flags) always win. Errors say which paths were tried
and which flag to pass."""

from __future__ import annotations

import importlib.resources
import os

import yaml

from treg.files import UserError

ASSETS_PACKAGE = "treg._eval"
PACKAGE_PREFIX = "package:"


class DataNotFound(UserError, FileNotFoundError):
    """A benchmark file or asset that is neither given nor found."""


def assets_dir() -> str:
    """The folder holding ``data.yaml``, ``arena_hard/`` and ``alpaca_eval/``: the installed package ``treg._eval``;
    in a source tree without an install that maps it (e.g. an editable install made before ``eval/`` was packaged),
    the ``eval/`` folder next to the ``treg`` package."""
    try:
        path = os.fspath(importlib.resources.files(ASSETS_PACKAGE))
    except (ModuleNotFoundError, TypeError):  # not installed / not a plain folder
        path = None
    if path and os.path.isfile(os.path.join(path, "data.yaml")):
        return path
    import treg

    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(treg.__file__))), "eval")
    if os.path.isfile(os.path.join(source, "data.yaml")):
        return source
    raise DataNotFound(
        f"treg's benchmark assets (package {ASSETS_PACKAGE}: judge prompts, annotator configs, data.yaml) are missing "
        f"from the treg installed at {os.path.dirname(os.path.abspath(treg.__file__))}; reinstall treg (pip install .)."
    )


def asset(*parts: str) -> str:
    """The path of an asset, e.g. ``asset("arena_hard", "arena-hard-v0.1.yaml")`` (not checked for existence)."""
    return os.path.join(assets_dir(), *parts)


def manifest() -> dict:
    with open(asset("data.yaml")) as f:
        return yaml.safe_load(f)


def checkout_data_root() -> str:
    """``shared/data`` beside the source checkout holding the imported ``treg`` (an editable install from it)."""
    import treg

    repo = os.path.dirname(os.path.dirname(os.path.abspath(treg.__file__)))
    return os.path.normpath(os.path.join(repo, "..", "shared", "data"))


def data_roots() -> list[str]:
    """The manifest's roots as absolute paths, in order (unset variables skipped), then :func:`checkout_data_root`
    (so a source checkout finds its data from any working directory)."""
    roots = []
    for root in manifest()["roots"]:
        root = os.path.expanduser(os.path.expandvars(str(root)))
        if not root or "${" in root or root.startswith("$"):
            continue
        if root.startswith(PACKAGE_PREFIX):
            root = os.path.join(assets_dir(), root[len(PACKAGE_PREFIX) :])
        roots.append(os.path.normpath(os.path.abspath(root)))  # relative: to the working directory
    beside = checkout_data_root()
    return roots + ([beside] if beside not in roots else [])


def find_root(relative: str, flag: str | None = None) -> str:
    """The first data root that holds ``relative`` (a file or a folder); the error names every place tried and
    ``flag``, the option that gives the path instead (when there is one)."""
    roots = data_roots()
    tried = [os.path.join(root, relative) for root in roots]
    for root, path in zip(roots, tried):
        if os.path.exists(path):
            return root
    env = os.environ.get("TREG_EVAL_DATA")
    note = "" if not env or os.path.isdir(env) else f" (TREG_EVAL_DATA={env} is not a directory)"
    raise DataNotFound(
        f"{relative} not found (tried {', '.join(tried) or 'no data root'}){note}; "
        f"{f'pass {flag} PATH or ' if flag else ''}set "
        "TREG_EVAL_DATA to a folder with the layout of eval/data.yaml (relative roots there are taken from the "
        "working directory)."
    )


def resolve(relative: str, flag: str | None = None) -> str:
    """The path of a data file under the first data root that has it (see :func:`find_root`)."""
    return os.path.join(find_root(relative, flag), relative)


def alpaca_reference(path: str | None = None) -> str:
    return path or resolve(manifest()["alpaca_eval"]["reference_outputs"], "--reference-outputs")


def arena_questions(bench: str, path: str | None = None) -> str:
    return path or resolve(manifest()["arena_hard"][bench]["questions"], "--questions")


def hh_rlhf_test(path: str | None = None) -> str:
    """HH-RLHF's harmless-base test pairs (treg's preference-data format reads them as they are)."""
    return path or resolve(manifest()["hh_rlhf"]["harmless_base_test"])


def arena_baselines(bench: str, paths: list[str] | None = None) -> list[str]:
    if paths:
        return list(paths)
    return [resolve(p, "--baseline-answers") for p in manifest()["arena_hard"][bench]["baseline_answers"]]
