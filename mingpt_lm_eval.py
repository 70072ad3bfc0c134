"""
Makes `lm_eval --model mingpt ...` work: registers mingpt's model type in the lm-evaluation-harness.

lm_eval knows a model type only once something registers it, and it imports no other package's code, so
`pip install` puts a one-line mingpt-lm-eval.pth into site-packages that imports this module when Python
starts, if Python can find it: an editable install's clone may be moved or deleted while the line stays,
and a failing import there would print a traceback at the start of every Python process. That must cost
nothing in processes that never use lm_eval, so this module imports nothing heavy: it adds a finder to
sys.meta_path that waits for `lm_eval.models` (lm_eval's table of model types, which it imports before it
looks a name up) and, once that has run, adds 'mingpt' to the table as a name lm_eval resolves only when
asked for it (mingpt.harness:MinGPTLM, which imports torch and the model).
"""

import sys

TARGET = 'mingpt.harness:MinGPTLM'


def register():
    """ add 'mingpt' to lm_eval's model registry, unless something registered it already """
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:  # an lm_eval without the lazy registry (before 0.4.10): register the class itself
        import mingpt.harness  # noqa: F401 (its @register_model does it)
        return
    if 'mingpt' not in model_registry:
        model_registry.register('mingpt', target=TARGET)


class RegisterWhenImported:
    """ a sys.meta_path finder: finds `lm_eval.models` through the other finders and has its module,
    once executed, call register() """

    def find_spec(self, name, path=None, target=None):
        if name != 'lm_eval.models':
            return None
        sys.meta_path.remove(self)  # once is enough, and the lookup below must not come back here
        from importlib.util import find_spec
        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_module_then_register(module):
                exec_module(module)
                try:
                    register()
                except Exception:  # never break lm_eval itself; say why 'mingpt' will be missing
                    import logging
                    logging.getLogger('mingpt').exception("could not register lm_eval's model type 'mingpt'")

            spec.loader.exec_module = exec_module_then_register
        return spec


def install():
    if 'lm_eval.models' in sys.modules:
        register()
    elif not any(isinstance(f, RegisterWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterWhenImported())


install()
