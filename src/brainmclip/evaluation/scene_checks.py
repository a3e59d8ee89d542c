"""Checks that only a simulated NSD allows: does a reconstruction show the right kind of object?

The simulator records what each image shows (``simulation/scenes.jsonl``). A CLIP that knows the scene world's
words (mini-CLIP, or a real CLIP) classifies every reconstruction zero-shot among the scene categories; *category
agreement* is the share whose predicted category names one of the largest objects of the true scene. The same
classifier on the true images gives the ceiling the metric can reach with that CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainmclip.errors import InvalidInputError

__all__ = ["SceneChecker", "scene_root"]


def scene_root(prepared_dir: Path) -> Path | None:
    """The simulated NSD a prepared dataset came from, or None (real NSD, published formats)."""
    from brainmclip.paths import resolve_path

    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    if not manifest.get("nsd_root"):
        return None
    root = resolve_path(manifest["nsd_root"], prepared_dir)
    return root if (root / "simulation" / "scenes.jsonl").is_file() else None


class SceneChecker:
    """Category agreement of images with their simulated scenes, scored by a zero-shot CLIP classifier."""

    def __init__(self, clip_model: str):
        from brainmclip.features.clip_models import load_clip
        from brainmclip.miniature.quality import ZeroShotClassifier

        self.clip_model = clip_model
        self.classifier = ZeroShotClassifier(load_clip(clip_model))
        self._scenes: dict[Path, dict] = {}
        self._truth: dict[tuple, np.ndarray] = {}

    @staticmethod
    def applies(clip_model: str) -> bool:
        """Random CLIPs ('tiny', 'random:...') classify nothing; every trained one can."""
        return not (clip_model == "tiny" or str(clip_model).startswith("random:"))

    def _scene_list(self, root: Path, ids) -> list:
        from brainmclip.data.synthetic.simulate import load_scenes

        if root not in self._scenes:
            self._scenes[root] = load_scenes(root)
        scenes = self._scenes[root]
        missing = [int(i) for i in ids if int(i) not in scenes]
        if missing:
            raise InvalidInputError(f"{root}: no scene recorded for NSD ids {missing[:3]}")
        return [scenes[int(i)] for i in ids]

    def check(self, root: Path, ids, recons: np.ndarray, truths: np.ndarray) -> dict:
        from brainmclip.miniature.quality import scene_category_agreement

        scenes = self._scene_list(root, ids)
        key = (root, tuple(int(i) for i in ids))
        if key not in self._truth:
            self._truth[key] = scene_category_agreement(truths, scenes, self.classifier)
        per_image = scene_category_agreement(recons, scenes, self.classifier)
        return {"category_agreement": float(per_image.mean()), "truth_zero_shot": float(self._truth[key].mean()),
                "clip": self.clip_model, "per_image": per_image}
