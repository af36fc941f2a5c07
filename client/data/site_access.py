"""The site YAML's two access lists: ``image_roots`` (folders images may
resolve into) and ``approved_apps`` (the app hashes the site runs), each
checked entry by entry. Parsed for :func:`client.data.site_config.parse_site_yaml`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from client.problem import Problem, yaml_problem

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_image_roots(
    raw: Any, base: Path, problems: list[Problem]
) -> tuple[Path, ...]:
    """``image_roots``: folders outside ``dataset_dir`` that the dataset's
    images may resolve into (a dataset of symbolic links into a PACS export,
    say). Without it, an image that resolves outside the dataset folder is
    refused: a link must not pull in files the site did not mean to use."""
    if raw is None:
        return ()
    fix = "list existing folders, e.g. image_roots: [/srv/pacs_export]"
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        problems.append(
            yaml_problem(
                "image_roots", f"`image_roots` is {raw!r}; expected folder paths", fix
            )
        )
        return ()
    roots = tuple((base / v).resolve() for v in raw)
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        problems.append(
            yaml_problem(
                "image_roots", f"`image_roots` folder {missing[0]} does not exist", fix
            )
        )
        return ()
    return roots


def parse_approved_apps(raw: Any, problems: list[Problem]) -> tuple[str, ...]:
    """``approved_apps``: the app hashes a site runs under app pinning.

    Each entry is what ``client.node.app_pinning.app_hash`` prints for an app the site
    has reviewed. A malformed entry is an error, not skipped: silently dropping it
    would refuse the app the site meant to approve, or hide a typo.
    """
    if raw is None:
        return ()
    fix = (
        "review the app, then copy the hash that `moefl app-hash <app folder or .fab>` "
        'prints, quoted: - "<64 hex characters>"'
    )
    if not isinstance(raw, list):
        problems.append(
            yaml_problem(
                "approved_apps",
                f"`approved_apps` is {raw!r}; expected a list of SHA-256 hex digests",
                fix,
            )
        )
        return ()
    n_before = len(problems)
    for i, value in enumerate(raw):
        if not (isinstance(value, str) and _SHA256.match(value)):
            problems.append(
                yaml_problem(
                    f"approved_apps[{i}]",
                    f"`approved_apps[{i}]` is {value!r}; expected 64 lower-case hex "
                    "characters (a SHA-256)",
                    fix,
                )
            )
    return tuple(raw) if len(problems) == n_before else ()
