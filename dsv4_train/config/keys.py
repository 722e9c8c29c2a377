"""Keys of a composed config that the schema lacks, with "did you mean" hints.

OmegaConf's struct mode refuses unknown keys at composition, but a key added with '+' (command line
or YAML) passes it and `OmegaConf.to_object` would drop it silently: `check_known_keys` refuses it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import List, Optional


class UnknownKeyError(ValueError):
    """A key that is not a field of the schema (added with '+' on the command line or in YAML)."""

    def __init__(self, message: str, keys: List[str]):
        super().__init__(message)
        self.keys = list(keys)


def schema_fields(full_key: str) -> List[str]:
    """Field names of the section holding `full_key` (for 'did you mean')."""
    from dsv4_train.config.schema import Config

    cls = Config
    for part in full_key.split(".")[:-1]:
        f = {x.name: x for x in dataclasses.fields(cls)}.get(part)
        if f is None or not dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None):
            return []
        cls = type(f.default_factory())
    return [x.name for x in dataclasses.fields(cls)]


def did_you_mean(full_key: str, cause: Optional[BaseException] = None) -> str:
    """Close names among the fields of the key's section: the schema's, or those of the node an
    OmegaConf error (`cause`) names, e.g. the sweeper's options for hydra.sweeper.n_trial."""
    leaf = full_key.split(".")[-1]
    parent = getattr(cause, "parent_node", None)
    fields = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else schema_fields(full_key)
    close = difflib.get_close_matches(leaf, fields, n=3)
    prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    return f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def check_known_keys(node, cls, prefix: str = "") -> None:
    """Raise UnknownKeyError for keys of a composed DictConfig that `cls` (a dataclass) lacks."""
    from omegaconf import DictConfig

    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = []
    for key in node.keys():
        if key not in fields:
            unknown.append(prefix + str(key))
            continue
        child = node._get_node(key)
        f = fields[key]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(sub):
            try:
                check_known_keys(child, type(sub), prefix + f"{key}.")
            except UnknownKeyError as e:
                unknown.extend(e.keys)
    if unknown:
        hints = "".join(did_you_mean(k) for k in unknown)
        raise UnknownKeyError(
            f"Unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not a field "
            f"of the schema (dsv4_train/config/schema.py), so it would be ignored.{hints} Remove it "
            "or fix the spelling ('+key=value' only adds keys the schema does not know).",
            unknown,
        )
