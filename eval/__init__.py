"""treg's benchmark assets: judge prompts (``arena_hard/``), annotator configs (``alpaca_eval/``) and the data
manifest (``data.yaml``). No code. This folder is the only copy: pyproject.toml installs it as the package
``treg._eval`` (package data), and :func:`treg.evaluation.data.assets_dir` finds it through that package."""
