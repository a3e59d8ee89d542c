"""``prepare_published``: NSD data as published preprocessed by other projects, to a prepared dataset.

Three formats are read, each into the same prepared layout as
:func:`brainmclip.data.prepare.prepare_subject`, one module each:

``brain-diffuser`` (:mod:`.brain_diffuser`)
    ``processed_data/subjNN/nsd_{train,test}_{fmriavg_nsdgeneral,stim,cap}_subN.npy``: betas averaged
    over repeats in raw NSD scale (int16 units, percent signal change x 300), stimuli, captions.
    Sessions 1-37 ("old" test set); rows follow the first appearance of each image.
``mindeye1`` (:mod:`.mindeye1`)
    webdataset shards ``{train,val,test}/*.tar``; per sample ``jpg``, ``nsdgeneral.npy`` (3 repeats
    x voxels, all-NaN rows = repeat not available), ``coco73k.npy`` and ``trial.npy``.
``mindeye2`` (:mod:`.mindeye2`)
    ``betas_all_subjNN_fp32_renorm.hdf5`` (one row per global trial, session-normalised) and
    webdataset shards ``wds/subjNN/{train,test,new_test}/*.tar`` whose ``behav.npy`` rows give the
    NSD index (column 0) and the global trial (column 5) of each sample.

:mod:`.build` holds the steps the three share, :mod:`.webdataset` the shard reader. The files
hold nsdgeneral voxel vectors only (nsdgeneral mask in C order on the (X, Y, Z) volume); the
ROI-based voxel groups need NSD's ROI files (``nsd_root``). Every input a run needs is checked
before the first shard or betas row is read. Every error a user can cause is a one-line
``ValueError`` or ``FileNotFoundError`` naming the file and what was expected.
"""

from __future__ import annotations

from brainmclip.atomic import locks_output
from brainmclip.data.prepared import PreparedSubject
from brainmclip.errors import InvalidInputError

from .brain_diffuser import prepare_brain_diffuser
from .mindeye1 import prepare_mindeye1
from .mindeye2 import prepare_mindeye2

__all__ = ["PUBLISHED_FORMATS", "prepare_published", "prepare_brain_diffuser", "prepare_mindeye1",
           "prepare_mindeye2"]

PUBLISHED_FORMATS = ("brain-diffuser", "mindeye1", "mindeye2")


@locks_output()
def prepare_published(fmt: str, input_dir, subject: int, out, nsd_root=None, normalize: str = "none",
                      val_size: int | None = None, detail_voxels: str = "roi", force: bool = False,
                      test_set: str | None = None, images: bool = True, single_trial: bool = False,
                      full_hash: bool = False) -> PreparedSubject:
    """Prepare one subject from a published preprocessed format into ``out``.

    Parameters
    ----------
    fmt : {'brain-diffuser', 'mindeye1', 'mindeye2'}
    input_dir : path
        The published files (see the module docstring for each layout).
    subject : int
        NSD subject 1-8.
    out : path
        Output folder; rerunning with the same inputs and options returns it at once.
    nsd_root : path, optional
        NSD root: its ROI files give the voxel groups, its design recovers Brain-Diffuser's
        NSD ids, its stimulus table and COCO files give captions, its stimuli give images.
    normalize : {'none', 'brain-diffuser'}
        'none' keeps the published scale (Brain-Diffuser: percent signal change; MindEye:
        the authors' normalisation); 'brain-diffuser' z-scores every voxel of every split
        with the mean and sd (ddof=1) of all non-test rows, train and val together, as
        Brain-Diffuser fits them on all its training images. 'session' is refused: the files
        have no session betas.
    val_size : int, optional
        Images held out from the end of train; default 859/8859 of train.
    detail_voxels : {'roi', 'nsdgeneral'}
    force : bool
        Replace an existing dataset prepared from other inputs or options.
    test_set : {'new', 'old'}, optional
        MindEye2 only: 'new' (default, ``new_test`` shards) or 'old' (``test`` shards).
    images : bool
        Copy the stimuli into the dataset.
    single_trial : bool
        MindEye2 only: one row per trial instead of per image.
    full_hash : bool
        Identify inputs above 64 MB by SHA-256 instead of size and mtime.
    """
    if fmt not in PUBLISHED_FORMATS:
        raise InvalidInputError(f"Unknown format={fmt!r}; choose from {list(PUBLISHED_FORMATS)}")
    common = dict(nsd_root=nsd_root, normalize=normalize, val_size=val_size, detail_voxels=detail_voxels,
                  images=images, force=force, full_hash=full_hash)
    if fmt == "mindeye2":
        return prepare_mindeye2(input_dir, subject, out, test_set=test_set or "new", single_trial=single_trial,
                                **common)
    if test_set not in (None, "old"):
        raise InvalidInputError(f"test_set={test_set!r}: {fmt} files hold the old test set only; leave test_set unset")
    if single_trial:
        raise InvalidInputError(f"single_trial=True: {fmt} files hold betas averaged over repeats; use mindeye2 or the "
                         "official NSD files for single trials")
    reader = prepare_brain_diffuser if fmt == "brain-diffuser" else prepare_mindeye1
    return reader(input_dir, subject, out, **common)
