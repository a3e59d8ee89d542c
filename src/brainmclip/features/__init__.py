"""Stage 2 of the data flow: images and captions to CLIP embeddings, stored per NSD image."""

from brainmclip.features.clip_extractor import ClipFeatureExtractor, module_outputs
from brainmclip.features.clip_models import ClipTowers, load_clip, random_clip
from brainmclip.features.feature_store import TARGETS, FeatureStore, open_feature_store

__all__ = ["ClipFeatureExtractor", "ClipTowers", "FeatureStore", "TARGETS", "load_clip", "module_outputs",
           "open_feature_store", "random_clip"]
