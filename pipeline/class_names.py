"""Defect class names: the one rule for what a class may be called (folders, episodes, MLflow tags, REST)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

#: A defect class name: a folder name under ``<root>/`` and a key in episodes, MLflow tags and REST requests.
#: ASCII letters, digits, ``_``, ``-``, ``.``, ``+``; starts with a letter or digit; at most 100 characters.
#: So it can never be a path (a slash, a backslash, ``..``), a hidden folder, or need quoting in a shell.
CLASS_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
_CLASS_NAME_RE = re.compile(CLASS_NAME_PATTERN)


def check_class_name(name: object) -> str:
    """Return ``name`` if it is a safe defect class name (:data:`CLASS_NAME_PATTERN`), else raise.

    Raises:
        ValueError: naming the bad name and the allowed characters (e.g. ``'../../x'``,
            ``'a/b'``, ``'Leather Fold'``, ``''``).
    """
    if not isinstance(name, str) or not _CLASS_NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"class name {name!r} is not a safe folder name: use ASCII letters, digits, '_', '-', '.', '+' "
            "(starting with a letter or digit, no '..', at most 100 characters)")
    return name


#: A validated class name (errors are located at the entry, e.g. ``folds.1.4``).
ClassName = Annotated[str, AfterValidator(check_class_name)]


__all__ = ["CLASS_NAME_PATTERN", "ClassName", "check_class_name"]
