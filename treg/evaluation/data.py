"""Benchmark data paths from ``eval/data.yaml``: the first existing data root, then the file under it; explicit paths
always win. Errors say which paths were tried and which flag to pass."""

from __future__ import annotations

import os

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = os.path.join(REPO_ROOT, "eval", "data.yaml")


class DataNotFound(FileNotFoundError):
    """A benchmark file that is neither given nor found through the manifest."""


def manifest() -> dict:
    with open(MANIFEST) as f:
        return yaml.safe_load(f)


def data_roots() -> list[str]:
    roots = []
    for root in manifest()["roots"]:
        root = os.path.expandvars(root)
        if not root or "${" in root:
            continue
        roots.append(root if os.path.isabs(root) else os.path.normpath(os.path.join(REPO_ROOT, root)))
    return roots


def resolve(relative: str, flag: str) -> str:
    """The path of a manifest file under the first data root that has it."""
    tried = [os.path.join(root, relative) for root in data_roots()]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise DataNotFound(f"{relative} not found (tried {', '.join(tried)}); pass {flag} PATH or set TREG_EVAL_DATA.")


def alpaca_reference(path: str | None = None) -> str:
    return path or resolve(manifest()["alpaca_eval"]["reference_outputs"], "--reference-outputs")


def arena_questions(bench: str, path: str | None = None) -> str:
    return path or resolve(manifest()["arena_hard"][bench]["questions"], "--questions")


def arena_baselines(bench: str, paths: list[str] | None = None) -> list[str]:
    if paths:
        return list(paths)
    return [resolve(p, "--baseline-answers") for p in manifest()["arena_hard"][bench]["baseline_answers"]]
