"""``general.*`` metadata (name, size label, license, sampling defaults...) as llama.cpp's converter derives it.

gguf-py's ``Metadata`` does the work (model card front matter, config.json, generation_config.json and
the folder name). The installed gguf release predates one change in llama.cpp @0c1e57098: it reads
``repetition_penalty`` from generation_config.json as the repeat penalty; we apply it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf


class _CallRecorder:
    """Stands in for a GGUFWriter: records ``add_*`` calls instead of storing values."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, method: str):
        if not method.startswith("add_"):
            raise AttributeError(method)
        return lambda *args: self.calls.append((method, *args))


def general_calls(model_dir: Path, n_params: int, generation_config: dict[str, Any]) -> list[tuple]:
    """Writer calls for general.type and the general.* authorship/sampling keys, in llama.cpp's order."""
    meta = gguf.Metadata.load(None, model_dir, None, n_params)
    if meta.sampling_penalty_repeat is None and "penalty_repeat" not in generation_config:
        meta.sampling_penalty_repeat = generation_config.get("repetition_penalty")
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    recorder = _CallRecorder()
    meta.set_gguf_meta_model(recorder)
    return [("add_type", gguf.GGUFType.MODEL)] + recorder.calls
