"""The pin file stored in every adapter or mixture directory: the base it was trained on.

``flywheel.json`` = ``{"base_model": name, "base_version": version}``. It is part of the
directory's content hash, so the same weights trained on two base versions are two adapters.
The rule that uses it is ``core.personalization.pinning.servable``.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.personalization.pinning import ORIGINAL

PIN_FILE = "flywheel.json"


def write_pin(directory: Path, base_model: str, base_version: str) -> None:
    (directory / PIN_FILE).write_text(json.dumps({"base_model": base_model, "base_version": base_version},
                                                 sort_keys=True))


def read_pin(directory: Path | str) -> tuple[str | None, str]:
    """(base model, base version) of an adapter directory; unpinned ones were trained on ``base``."""
    file = Path(directory) / PIN_FILE
    if not file.exists():
        return None, ORIGINAL
    data = json.loads(file.read_text())
    return data.get("base_model"), str(data.get("base_version") or ORIGINAL)
