"""crossvlm for lmms-eval (`pip install 'crossvlm[lmms-eval]'`).

`manifest()` is the `lmms_eval.models` entry point that pyproject.toml registers, so
`lmms-eval --model crossvlm` finds `CrossVLMLmms` without crossvlm being part of lmms-eval.
`tasks` holds the functions a task YAML needs to evaluate a crossvlm data set through lmms-eval.
"""

from __future__ import annotations


def manifest():
    """lmms-eval's registration record for the `crossvlm` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="crossvlm", simple_class_path="crossvlm.integrations.lmms_eval.model.CrossVLMLmms")
