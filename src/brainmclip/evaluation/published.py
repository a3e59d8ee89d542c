"""Published numbers to print beside ours (NSD, mean of subjects 1, 2, 5, 7, as the papers report them).

Identification metrics are fractions here (0.918 = 91.8%), like our own results. These are
the papers' numbers, computed by their authors with their own protocols and test sets; they
are shown for orientation, not as a like-for-like comparison.
"""

from __future__ import annotations

from brainmclip.evaluation.metric_table import METRICS

__all__ = ["PUBLISHED", "PUBLISHED_ABLATIONS"]


def _row(method, values, params=None, note=""):
    return {"method": method, "metrics": dict(zip(METRICS, values, strict=True)), "params": params, "note": note}


PUBLISHED = [
    _row("BrainMCLIP (CLIP only)", (.212, .263, .918, .970, .946, .952, .643, .354), "0.73B", "old test set"),
    _row("BrainMCLIP + MindEye low-level", (.330, .312, .949, .978, .945, .947, .645, .356), "0.73B", "old test set"),
    _row("MindEye1", (.309, .323, .947, .978, .938, .941, .645, .367), "1.45B", "old test set"),
    _row("MindEye2", (.322, .431, .961, .986, .954, .930, .619, .344), "2.58B", "new test set, 40 h"),
    _row("Brain-Diffuser", (.254, .356, .942, .962, .872, .915, .775, .423), None, "old test set"),
    _row("MindBridge", (.151, .263, .877, .955, .924, .947, .712, .418), "0.69B", "one cross-subject model"),
    _row("MindDiffuser", (.256, .344, .852, .843, .784, .791, .884, .551), None, ""),
    _row("MindDiffuser + MindEye", (.278, .370, .955, .983, .945, .951, .706, .468), None, ""),
]


#: BrainMCLIP's ablation tables (mean of subjects 1, 2, 5, 7), by table and row key; values in metric-table order.
PUBLISHED_ABLATIONS = {
    3: {
        "text_only": (.065, .107, .5967, .7356, .7841, .7846, .858, .555),
        "text_image_semantic": (.088, .211, .7416, .8721, .9003, .9038, .725, .452),
        "text_image_detail": (.166, .259, .8664, .9380, .9291, .9395, .668, .386),
        "no_cross_reconstruction": (.204, .257, .9090, .9655, .9403, .9393, .654, .363),
        "full": (.212, .263, .918, .970, .946, .952, .643, .354),
    },
    4: {
        "loss_mse_infonce": (.205, .239, .9010, .9657, .9306, .9327, .669, .371),
        "loss_mse_softclip": (.201, .238, .8984, .9663, .9312, .9311, .657, .374),
        "loss_mse_sims": (.197, .214, .8968, .9582, .9223, .9222, .693, .370),
        "loss_mse_cka": (.200, .233, .8906, .9599, .9311, .9307, .676, .376),
        "full": (.212, .263, .918, .970, .946, .952, .643, .354),
    },
}
