"""combireg's version, in a module of its own so that any module can name it.

Why not ``combireg.__version__`` alone: the package's ``__init__`` is the Python front door (it
resolves ``combireg.register`` from :mod:`combireg.api`), so a library module importing from it
would import upwards and close a cycle.
"""

__version__ = "0.1.0"
