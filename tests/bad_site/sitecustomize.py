"""Test only: a site that poisons its uploads, or never answers. tests/test_flower.py puts this folder on
the PYTHONPATH of one site, so that Python imports this file first in each of its processes (the
ClientApp's and the worker's included); it then gives client.Client.fit, once the app imports it, uploads
full of NaN, as a broken or hostile site would send (the honest Client refuses to send them), or with
BAD_SITE=hang in the environment, makes it wait an hour: a site that is there but never answers."""

import importlib.machinery
import os
import sys
import time


class _PoisonClient:
    """Import hook: the first import of module `client` runs as usual, then its Client.fit is wrapped."""

    def find_spec(self, name, path=None, target=None):
        if name != "client":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            fit = module.Client.fit

            def poisoned(self, global_state, task):
                if os.environ.get("BAD_SITE") == "hang":
                    time.sleep(3600)
                upload, n, loss = fit(self, global_state, task)
                return {k: v * float("nan") for k, v in upload.items()}, n, loss

            module.Client.fit = poisoned

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PoisonClient())
