#!/usr/bin/env python
"""The sequence-change check on real images: the MNI152 2009c T1w and T2w templates (whole head,
skull on), one against the other, and the T1w against a copy of itself with a gamma of 0.8,
Gaussian noise (3 % of its maximum) and a 3 mm shift. Prints one line per pair.

The templates come from the ``autoafids==0.1.4`` wheel (the data scripts fetch it into
``.cache/autoafids``, or ``$COMBIREG_DATA_CACHE``)::

    python benchmarks/sequence_check_template.py .cache/autoafids/resources
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    import itk
    import numpy as np
    import torch

    from combireg.api import _prepare, as_image_pair
    from combireg.params import default_settings
    from combireg.sequences import settings_for_sequences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("resources", type=Path, help="autoafids' resources folder")
    args = parser.parse_args(argv)
    t1 = args.resources / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    t2 = args.resources / "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
    torch.set_num_threads(2)
    settings = default_settings().replace(sequence_change_detection=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = itk.imread(str(t1), itk.F)
        values = itk.array_from_image(image)
        noise = np.random.default_rng(0).normal(0.0, 0.03 * values.max(), values.shape)
        other = (np.roll(values, 3, axis=2) / values.max()) ** 0.8 * values.max() + noise
        copy = itk.image_from_array(other.astype(np.float32))
        copy.CopyInformation(image)
        itk.imwrite(copy, str(Path(tmp) / "t1_other.nii.gz"))
        pairs = {"T1w against T2w": (t1, t2), "T2w against T1w": (t2, t1),
                 "T1w against its gamma/noise/3 mm copy": (t1, Path(tmp) / "t1_other.nii.gz")}
        for name, (source, target) in pairs.items():
            source_img, target_img = as_image_pair(str(source), str(target))
            prepared = _prepare(source_img, target_img, None, None, settings, "cpu")
            _, note = settings_for_sequences(settings, prepared.source, prepared.target, prepared.geometry.spacing)
            print(json.dumps({"pair": name, **{k: note.get(k) for k in ("score", "tissue_order", "action")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
