"""Other registration methods behind combireg's inputs and outputs.

Each adapter registers a source to a target with another tool and returns an object whose
``save(outdir)`` writes exactly the files of ``combireg run`` (``field.nii.gz``,
``field_inverse.nii.gz``, ``warped_<k>.nii.gz``, ``params.txt``, ``report.json``), so that
evaluation and benchmark tools treat every method alike.

* :mod:`combireg.adapters.elastix`: B-spline registration with itk-elastix
  (:func:`~combireg.adapters.elastix.register_elastix`).
"""
