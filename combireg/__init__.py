"""combireg: deformable 3-D image registration by simultaneous optimisation of similarity metrics.

One call from Python::

    import combireg
    result = combireg.register("pre_t1.nii.gz,pre_t2.nii.gz", "post_t1.nii.gz,post_t2.nii.gz",
                               params="params/default.txt")
    result.save("out/")
    combireg.apply_field("out/field.nii.gz", "pre_tumour_mask.nii.gz", "tumour_on_post.nii.gz", labels=True)
"""
from .errors import CombiregError
from .geometry import Geometry
from .image import Image
from .version import __version__


def __getattr__(name):
    # Why lazy: keeps `import combireg` light (no params/ITK import) for tools that only need
    # geometry or errors; `combireg.register` resolves on first use.
    if name in ("register", "Result"):
        from . import api

        return getattr(api, name)
    if name == "apply_field":
        from .apply import apply_field

        return apply_field
    raise AttributeError(f"module 'combireg' has no attribute {name!r}")


__all__ = ["register", "Result", "apply_field", "Image", "Geometry", "CombiregError", "__version__"]
