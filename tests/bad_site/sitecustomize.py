"""Test only: a site that poisons its uploads. tests/test_flower.py puts this folder on the PYTHONPATH of one
SuperNode, so that Python imports this file first in each of its processes (the ClientApp's included);
it then gives client.Client.fit, once the app imports it, uploads full of NaN, as a broken or hostile
site would send (the honest Client refuses to send them)."""

import importlib.machinery
import sys


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
                upload, n, loss = fit(self, global_state, task)
                return {k: v * float("nan") for k, v in upload.items()}, n, loss

            module.Client.fit = poisoned

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PoisonClient())
