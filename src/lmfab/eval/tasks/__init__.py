"""lmfab's offline lm-eval tasks: YAML files over jsonl items in this folder.

``lmfab_cloze`` (last-word prediction, LAMBADA-style) and ``lmfab_choice`` (the true next
line among three from other documents, HellaSwag-style) are made by :mod:`.build` from the
shipped sample corpus's held-out documents; docs/evaluation.md says how and with which
caveats. lm-eval reads the YAML files (``TaskManager(include_path=...)``); ``utils.py`` is
the loader they name.
"""
