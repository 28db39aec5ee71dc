"""The ``qualityguide`` command line: the commands (:mod:`.commands`) and the pieces only they use.

``score`` (:mod:`.score`, rows kept by :mod:`.scorefile`), ``label`` (:mod:`.label`, merged into an
imagefolder's ``metadata.csv`` by :mod:`.imagefolder`), ``demo`` (:mod:`.demo`) and ``lgdm`` (:mod:`.lgdm`). The
library never imports this package (``tests/test_layout.py`` checks it); the entry point is
``qualityguide.cli:main``.
"""

from .commands import main

__all__ = ["main"]
