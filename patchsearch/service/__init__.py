"""``patchsearch serve``: an HTTP inspection service over the library (extra ``serve``).

:mod:`.registry` holds the loaded categories (hot reload, shared backbones, batched
inference); :mod:`.app` is the FastAPI application. ``import patchsearch`` imports
nothing of this package.
"""
