"""The public API (issue 14): ``jaxrlhf.__all__`` and every public module's ``__all__``.

* ``import jaxrlhf`` imports nothing heavy, and importing the losses, ops and steps -- through the lazy
  top-level names and through their home modules -- pulls in none of torch, tensorflow, datasets,
  transformers (checked in a fresh interpreter, where ``sys.modules`` is not shared with other tests);
* every top-level name resolves to the very object its home module exports (and lists in its ``__all__``);
* every module of the package is in :data:`PUBLIC_MODULES` and declares ``__all__``; every name there
  exists, every function and class there has its own docstring, and the array APIs (losses, ops) and the
  algorithm steps document their arguments and results (``Args``/``Returns``, every parameter named).
"""

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

import jaxrlhf

HEAVY = ("torch", "tensorflow", "datasets", "transformers")

# Every module of the package; a new module must be added here (and declare ``__all__``).
PUBLIC_MODULES = [
    "jaxrlhf", "jaxrlhf.abstention",
    "jaxrlhf.algos", "jaxrlhf.algos.dpo", "jaxrlhf.algos.dpo_losses", "jaxrlhf.algos.grpo", "jaxrlhf.algos.ppo",
    "jaxrlhf.algos.reward", "jaxrlhf.algos.rollout", "jaxrlhf.algos.sft",
    "jaxrlhf.checkpoint", "jaxrlhf.cli", "jaxrlhf.compile_stats", "jaxrlhf.config", "jaxrlhf.distributed",
    "jaxrlhf.data", "jaxrlhf.data.batching", "jaxrlhf.data.formats", "jaxrlhf.data.iterator", "jaxrlhf.data.sources",
    "jaxrlhf.data.tokenize",
    "jaxrlhf.drivers", "jaxrlhf.drivers.core", "jaxrlhf.drivers.dpo", "jaxrlhf.drivers.reward", "jaxrlhf.drivers.rl",
    "jaxrlhf.drivers.sft",
    "jaxrlhf.evaluate", "jaxrlhf.frontier", "jaxrlhf.generate", "jaxrlhf.host_memory", "jaxrlhf.kl_control",
    "jaxrlhf.errors", "jaxrlhf.judge", "jaxrlhf.labeling",
    "jaxrlhf.loop", "jaxrlhf.losses",
    "jaxrlhf.models", "jaxrlhf.models.bert", "jaxrlhf.models.config", "jaxrlhf.models.gguf", "jaxrlhf.models.gpt2",
    "jaxrlhf.models.heads", "jaxrlhf.models.hf", "jaxrlhf.models.hub", "jaxrlhf.models.layers", "jaxrlhf.models.lora",
    "jaxrlhf.models.llama", "jaxrlhf.models.mixed_precision", "jaxrlhf.models.reward_model",
    "jaxrlhf.models.tensors",
    "jaxrlhf.ops", "jaxrlhf.ops.advantages", "jaxrlhf.ops.gae", "jaxrlhf.ops.kl", "jaxrlhf.ops.logprobs",
    "jaxrlhf.ops.masked",
    "jaxrlhf.policy_eval", "jaxrlhf.report", "jaxrlhf.rewards", "jaxrlhf.safety", "jaxrlhf.sampling", "jaxrlhf.seeds",
    "jaxrlhf.sharding", "jaxrlhf.study", "jaxrlhf.study_report", "jaxrlhf.train_state",
]

# The algorithm steps and the state/optimizer they run on: documented like the array APIs.
STEPS = [
    "sft_step", "sft_eval", "reward_step", "dpo_step", "dpo_extra", "ppo_init_params", "ppo_experience",
    "ppo_update", "policy_init_params", "grpo_experience", "grpo_update", "rloo_experience", "rloo_update",
    "make_optimizer", "init_sharded_state", "jit_step", "gradient_step",
]

# What a training script imports; none of it may need torch / tensorflow / datasets / transformers.
LIGHT_TOP_LEVEL = [
    *STEPS, "dpo_loss", "ipo_loss", "bradley_terry_loss", "ranking_loss", "plackett_luce_dpo_loss",
    "ppo_policy_loss", "ppo_value_loss", "kto_loss", "gae", "kl_penalty", "masked_whiten", "next_token_logprobs",
    "grpo_advantages", "rloo_advantages", "TrainState", "PREFERENCE_LOSSES", "PPO", "GRPO", "RLOO",
]
LIGHT_MODULES = [
    "jaxrlhf.losses", "jaxrlhf.ops", "jaxrlhf.algos.sft", "jaxrlhf.algos.reward", "jaxrlhf.algos.dpo",
    "jaxrlhf.algos.ppo", "jaxrlhf.algos.grpo", "jaxrlhf.algos.rollout", "jaxrlhf.train_state",
]


def _own_doc(obj) -> str:
    """The object's own docstring: not inherited, not the signature dataclasses / NamedTuple make up."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = (doc or "").strip()
    return "" if doc.startswith(f"{obj.__name__}(") else doc


def test_import_is_light_and_steps_pull_in_no_torch_tensorflow_datasets_transformers():
    """``import jaxrlhf`` imports not even jax; the losses/ops/steps (and every public name) no heavy library."""
    code = textwrap.dedent(f"""
        import sys
        HEAVY = {HEAVY!r}
        def leaked():
            return sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))

        import jaxrlhf
        assert "jax" not in sys.modules, "import jaxrlhf imported jax"
        assert jaxrlhf.__version__
        print("after import jaxrlhf:", leaked())

        from jaxrlhf import {", ".join(LIGHT_TOP_LEVEL)}
        print("after top-level names:", leaked())
        import importlib
        mods = [importlib.import_module(m) for m in {LIGHT_MODULES!r}]
        from jaxrlhf.losses import *  # noqa: F403
        from jaxrlhf.ops import *  # noqa: F403
        assert jaxrlhf.ops.gae is gae and jaxrlhf.algos.dpo.dpo_step is dpo_step
        print("after home modules:", leaked())
        for name in jaxrlhf.__all__:  # models, rewards, drivers, ...: heavy libraries load only when used
            getattr(jaxrlhf, name)
        print("after every public name:", leaked())
        print("LEAKED=" + ",".join(leaked()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    leaked = out.stdout.strip().splitlines()[-1].removeprefix("LEAKED=")
    assert leaked == "", f"imported by the public losses/ops/steps: {leaked}\n{out.stdout}"


def test_top_level_names_are_the_home_modules_objects():
    assert len(jaxrlhf.__all__) == len(set(jaxrlhf.__all__))
    submodules = {m.name for m in pkgutil.iter_modules(jaxrlhf.__path__)}
    assert not submodules & set(jaxrlhf.__all__), "a top-level name would be shadowed by its submodule"
    for name in jaxrlhf.__all__:
        module, attr = jaxrlhf._EXPORTS[name].split(":")
        assert attr == name
        home = importlib.import_module(module)
        assert getattr(jaxrlhf, name) is getattr(home, attr), name
        assert name in home.__all__, f"{name} is exported by jaxrlhf but not by {module}.__all__"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        jaxrlhf.not_a_name  # noqa: B018


def test_dir_lists_all_and_the_lazy_names():
    names = dir(jaxrlhf)
    assert "__all__" in names and "__version__" in names
    assert set(jaxrlhf.__all__) <= set(names)
    assert {"losses", "ops", "algos", "models"} <= set(names)


def test_every_module_is_listed_and_declares_all():
    found = {"jaxrlhf"} | {m.name for m in pkgutil.walk_packages(jaxrlhf.__path__, "jaxrlhf.")}
    assert found == set(PUBLIC_MODULES), f"add to / remove from PUBLIC_MODULES: {found ^ set(PUBLIC_MODULES)}"
    for name in PUBLIC_MODULES:
        mod = importlib.import_module(name)
        assert isinstance(getattr(mod, "__all__", None), list), f"{name} declares no __all__ list"
        assert len(mod.__all__) == len(set(mod.__all__)), f"{name}.__all__ has duplicates"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_names_exist_and_have_docstrings(module):
    mod = importlib.import_module(module)
    undocumented = []
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which does not exist"
        obj = getattr(mod, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not _own_doc(obj):
            undocumented.append(name)
    assert not undocumented, f"{module}: no docstring for {undocumented}"


def _array_api_functions():
    import jaxrlhf.losses
    import jaxrlhf.ops

    fns = [(f"losses.{n}", getattr(jaxrlhf.losses, n)) for n in jaxrlhf.losses.__all__]
    fns += [(f"ops.{n}", getattr(jaxrlhf.ops, n)) for n in jaxrlhf.ops.__all__]
    return [(label, fn) for label, fn in fns if inspect.isfunction(fn)]


def test_losses_ops_and_steps_document_arguments_and_results():
    fns = _array_api_functions() + [(n, getattr(jaxrlhf, n)) for n in STEPS]
    assert len(fns) > 40
    missing = [label for label, fn in fns if not re.search(r"^\s*Args\b", fn.__doc__, re.M)
               or not re.search(r"^\s*Returns:", fn.__doc__, re.M)]
    assert not missing, f"no Args/Returns section: {missing}"


def test_losses_and_ops_name_every_parameter_and_a_shape():
    """The array APIs' docstrings describe every argument and say what shape comes in or out."""
    problems = []
    for label, fn in _array_api_functions():
        doc = fn.__doc__
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unnamed = [p.name for p in params if not re.search(rf"\b{re.escape(p.name)}\b", doc)]
        if unnamed:
            problems.append(f"{label}: {unnamed} not described")
        if not re.search(r"\[[^\]]*\]|scalar", doc):
            problems.append(f"{label}: no shape")
    assert not problems, "\n".join(problems)
