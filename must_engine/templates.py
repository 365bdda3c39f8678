"""Prompt template sets for building zero-shot heads (data lives in templates.json)."""

import json
from pathlib import Path

TEMPLATE_SETS: dict[str, list[str]] = {
    name: templates
    for name, templates in json.loads((Path(__file__).with_name("templates.json")).read_text()).items()
    if not name.startswith("_")
}
