"""An audit: the adapted model and the zero-shot model it started from, scored on the same labelled images.

Labels are read here and only here, for scoring; nothing is trained. Each side is `evaluate`, the
function behind `must eval`, so an audit's numbers are the ones `must eval` prints for the same folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from must_engine.base_models import FetchWeights
from must_engine.bucket import zero_shot_of
from must_engine.evaluate import class_key, evaluate
from must_engine.predictor import Predictor


def unknown_folders(folder_names: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Folder names that match none of the class names (case, spacing and underscores ignored)."""
    known = {class_key(name) for name in class_names}
    return [name for name in folder_names if class_key(name) not in known]


def audit(
    artifact_dir: Path, root: Path, *, device: str = "auto", fetch_weights: FetchWeights | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """`{"n", "adapted": {...}, "zero_shot": {...}}` on `root/<class name>/<images>`, side by side.

    Folders that are no class of the model raise ValueError (callers check first with unknown_folders).
    """
    report = on_progress or (lambda _: None)
    adapted = Predictor.load(artifact_dir, device=device)
    result: dict[str, Any] = {"adapted": evaluate(adapted, root).to_dict()}
    report(0.5)
    result["zero_shot"] = evaluate(zero_shot_of(adapted, device=device, fetch_weights=fetch_weights), root).to_dict()
    report(1.0)
    result["n"] = result["adapted"]["n"]
    return result
