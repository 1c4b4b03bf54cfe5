"""Hook specifications: the whole public contract between core and ``posttrain.plugins`` modules.

Where each hook fires, as the training loop reads::

    posttrain train METHOD ...
      discover entry points (metadata only)            # posttrain.methods / .rewards / .plugins
      load the ``posttrain.plugins`` modules enabled   # pluggy registers their hookimpls
      posttrain_register_methods(registry)             # in-process methods (tests, notebooks)
      posttrain_register_rewards(registry)             # reward functions / verifiers by name
      posttrain_add_callbacks(registry, config)        # loggers and training-event callbacks
      method.setup(ctx)                                # reference model, precomputation ...
      for step in range(max_steps):
          for micro_batch in step:                      # gradient accumulation
              [method.rollout(model, batch, ctx)]       # online methods only
              method.loss(model, batch, ctx)            # -> LossOutput(loss_sum, n_items, metrics)
          optimizer step                                # grads scaled by 1 / (sum of n_items)
          callback.on_log(ctx, metrics)                 # every logging_steps
          callback.on_evaluate(ctx, metrics)            # every eval_steps
          callback.on_save(ctx, checkpoint_dir)         # every save_steps
      callback.on_train_end(ctx, outcome)               # finished, interrupted or failed

Methods and rewards that a *distribution* provides are normally declared as entry points
(``posttrain.methods`` and ``posttrain.rewards``), so ``posttrain list`` can show them without
importing anything. The register hooks below are for what cannot be declared statically: methods
defined in a test or a notebook, or families of rewards generated at run time.

Implementations may accept any subset of a hook's arguments, so adding an argument to a hook never
breaks an existing plugin. Removing an argument or a hook goes through a deprecation first: pluggy's
``warn_on_impl`` / ``warn_on_impl_args`` on the spec warn every implementation for at least one minor
release (docs/api.md, "Compatibility").
"""

from __future__ import annotations

from typing import Any

import pluggy

from posttrain._registry import CallbackRegistry, MethodRegistry, RewardRegistry

__all__ = [
    "CallbackRegistry",
    "MethodRegistry",
    "RewardRegistry",
    "hookimpl",
    "posttrain_add_callbacks",
    "posttrain_register_methods",
    "posttrain_register_rewards",
]

hookspec = pluggy.HookspecMarker("posttrain")
hookimpl = pluggy.HookimplMarker("posttrain")
"""Marks a function as the implementation of one of the hooks below (``@hookimpl``).

.. versionadded:: 0.1
"""

# -- registration ----------------------------------------------------------------------------------


@hookspec
def posttrain_register_methods(registry: MethodRegistry) -> None:
    """Register training methods that are not declared as ``posttrain.methods`` entry points.

    Called once per process, before a method is resolved by name. Call
    ``registry.add(name, method_class)`` zero or more times; the return value is ignored.
    All implementations are called. A name already provided by an installed distribution is a
    conflict and fails with an error that names both providers.

    :param registry: a :class:`MethodRegistry` (``posttrain.hookspecs.MethodRegistry``); ``add(name, cls)`` with
        ``name`` matching ``[a-z][a-z0-9_-]*``.

    Example::

        from posttrain import hookimpl
        from my_package import MyMethod

        @hookimpl
        def posttrain_register_methods(registry):
            registry.add("my-method", MyMethod)

    .. versionadded:: 0.1
    """


@hookspec
def posttrain_register_rewards(registry: RewardRegistry) -> None:
    """Register reward functions or verifiers by name, for configs to refer to.

    Called once per process, before the rewards a config names (``reward_funcs``) are resolved.
    Call ``registry.add(name, func)``; ``func(prompts, completions, **columns)`` returns one
    ``float`` per completion, or ``None`` where the reward does not apply. ``columns`` holds the
    dataset's other columns, one value per completion; a function that declares ``completion_ids``
    (or takes ``**columns``) also receives the completions' token ids. The return value of the
    hook is ignored; all implementations are called.

    :param registry: a :class:`RewardRegistry` (``posttrain.hookspecs.RewardRegistry``).

    Example::

        from posttrain import hookimpl

        def shorter_is_better(prompts, completions, **columns):
            return [-len(c) / 100 for c in completions]

        @hookimpl
        def posttrain_register_rewards(registry):
            registry.add("shorter", shorter_is_better)

    .. versionadded:: 0.1
    """


# -- training events -------------------------------------------------------------------------------


@hookspec
def posttrain_add_callbacks(registry: CallbackRegistry, config: Any) -> None:
    """Add loggers or other training-event callbacks to a run.

    Called once per run, after the configuration is resolved and before the first step. Call
    ``registry.add(callback)`` with any object that implements some of ``on_train_begin(ctx)``,
    ``on_log(ctx, metrics)``, ``on_evaluate(ctx, metrics)``, ``on_save(ctx, checkpoint_dir)`` and
    ``on_train_end(ctx, outcome)`` (the :class:`posttrain.Callback` protocol); missing methods are
    simply not called, and ``posttrain.testing.kit`` reports near misses such as ``on_logs``. Callbacks run on the main
    process only. All implementations are called; the return value is ignored.

    :param registry: a :class:`CallbackRegistry` (``posttrain.hookspecs.CallbackRegistry``).
    :param config: the resolved run configuration (a method's config dataclass), so a plugin can
        decide from ``config.report_to`` whether to add itself. ``report_to`` names are checked before
        the run starts against ``tensorboard``, ``all``, ``none`` and the names of the installed
        ``posttrain.plugins`` entry points, so a plugin recognises the value its entry point is named
        after (``print = "my_package.hooks"`` below).

    Example::

        from posttrain import hookimpl

        class PrintLoss:
            def on_log(self, ctx, metrics):
                print(ctx.step, metrics["loss"])

        @hookimpl
        def posttrain_add_callbacks(registry, config):
            if "print" in config.report_to:
                registry.add(PrintLoss())

    .. versionadded:: 0.1
    """
