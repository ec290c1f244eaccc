"""Train/valid/test splits by piece, committed as a manifest of corpus keys.

The manifest is made once (``python -m coplayer.data.splits``) with a fixed
seed and committed, so the split never drifts with a library version.
Pieces with the same harmonisation (identical notes up to transposition)
form one group and always land in the same split.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from importlib import resources
from pathlib import Path

from coplayer.data.corpus import chorale_cache_path, harmonisation_signature, load_bach_chorales
from coplayer.data.notes import Score
from coplayer.errors import DataError

SPLITS = ("train", "valid", "test")
RATIOS = (8, 1, 1)
SEED = 20211107
MANIFEST = "bach_chorales_split.json"


def group_duplicates(scores: dict[str, Score]) -> list[list[str]]:
    """Corpus keys grouped by harmonisation signature, each group sorted."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(scores):
        groups[harmonisation_signature(scores[key])].append(key)
    return sorted(groups.values())


def make_manifest(scores: dict[str, Score], seed: int = SEED) -> dict:
    """Assign whole groups to splits 8:1:1 by piece count, deterministically."""
    groups = group_duplicates(scores)
    random.Random(seed).shuffle(groups)
    total = sum(len(g) for g in groups)
    targets = [total * r / sum(RATIOS) for r in RATIOS]
    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}
    for group in groups:
        # Fill valid and test first up to their share; the rest is train.
        for name, target in zip(("valid", "test"), targets[1:]):
            if len(assigned[name]) + len(group) <= round(target):
                assigned[name].extend(group)
                break
        else:
            assigned["train"].extend(group)
    return {
        "corpus": "music21 corpus.getComposer('bach'), four-part pieces",
        "seed": seed,
        "ratios": list(RATIOS),
        "duplicate_groups": [g for g in sorted(groups) if len(g) > 1],
        **{name: sorted(keys) for name, keys in assigned.items()},
    }


def manifest_path() -> Path:
    return Path(str(resources.files("coplayer.data").joinpath(MANIFEST)))


def load_manifest(path: Path | None = None) -> dict:
    path = path or manifest_path()
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"split manifest {path} is unreadable: {exc}") from exc
    missing = [s for s in SPLITS if s not in manifest]
    if missing:
        raise DataError(f"split manifest {path} lacks {', '.join(missing)}")
    return manifest


def load_split(split: str, manifest: dict | None = None) -> list[Score]:
    """The chorales of one split, in manifest order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    manifest = manifest or load_manifest()
    scores, _ = load_bach_chorales()
    absent = [k for k in manifest[split] if k not in scores]
    if absent:
        raise DataError(
            f"{len(absent)} pieces of the {split} split are not in this music21 corpus "
            f"(first: {absent[0]}); the manifest was made with another corpus, or the "
            f"parsed-corpus cache in {chorale_cache_path().parent} is stale: delete it to rebuild"
        )
    return [scores[k] for k in manifest[split]]


def main() -> None:
    scores, report = load_bach_chorales()
    manifest = make_manifest(scores)
    manifest["skipped"] = {reason: len(keys) for reason, keys in report.skipped.items()}
    path = manifest_path()
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    sizes = {s: len(manifest[s]) for s in SPLITS}
    print(f"wrote {path}: {sizes}, {len(manifest['duplicate_groups'])} duplicate groups")


if __name__ == "__main__":
    main()
