"""Checks of a run's options against this machine, made before any model loads.

An option that would be ignored or fail late (an attention kernel that is not installed, fp16 on a CPU,
a ``report_to`` name nothing recognises, a split of a single-file dataset) is refused here, so the user
learns it in a second rather than after the model and the data have loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from posttrain._errors import ConfigError

BUILTIN_REPORTERS = ("tensorboard", "none", "all")
#: Packages that provide well-known ``report_to`` names, for the install hint.
KNOWN_REPORTERS = {
    "wandb": "posttrain-trackers[wandb]",
    "mlflow": "posttrain-trackers[mlflow]",
    "trackio": "posttrain-trackers[trackio]",
}
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
_FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check(config: Any, device: str) -> None:
    """Every problem of ``config`` on this machine (``device``: "cpu", "cuda", ...), reported together."""
    problems = precision_problems(config, device) + attention_problems(config, device)
    problems += report_to_problems(config) + dataset_split_problems(config)
    if problems:
        raise ConfigError(problems)


def precision_problems(config: Any, device: str) -> list[str]:
    import torch

    on_cuda = device == "cuda"
    found = []
    if getattr(config, "fp16", False) and not on_cuda:
        found.append(
            f"fp16 is true but this run is on {device.upper()}: float16 mixed precision (with loss "
            "scaling) needs a CUDA GPU and would silently not apply; drop --fp16, or use --bf16 true"
        )
    if getattr(config, "bf16", False) and on_cuda and not torch.cuda.is_bf16_supported():
        found.append(
            f"bf16 is true but {torch.cuda.get_device_name()} has no bfloat16 support; use --fp16 true instead"
        )
    return found


def attention_problems(config: Any, device: str) -> list[str]:
    name = getattr(config, "attn_implementation", None)
    if not name:
        return []
    if "/" in name:  # a hub kernel such as kernels-community/flash-attn, loaded by the `kernels` package
        if importlib.util.find_spec("kernels") is None:
            return [
                f"attn_implementation {name!r} is a hub kernel, which needs the `kernels` package; run "
                "`pip install kernels`, or use sdpa"
            ]
        return []
    if name not in ATTENTION:
        close = difflib.get_close_matches(name, ATTENTION, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [
            f"attn_implementation {name!r} is not an attention implementation{hint}; use one of {', '.join(ATTENTION)}"
        ]
    module = _FLASH_MODULES.get(name)
    if module is None:
        return []
    if device != "cuda":
        return [
            f"attn_implementation {name!r} runs only on CUDA GPUs and this run is on {device.upper()}; use sdpa "
            "(the default)"
        ]
    if importlib.util.find_spec(module) is None:
        return [
            f"attn_implementation {name!r} needs the {module} package, which is not installed; install it "
            "(`pip install flash-attn --no-build-isolation`) or use sdpa"
        ]
    return []


def known_reporters() -> dict[str, str]:
    """``report_to`` names this installation recognises -> who provides each."""
    from posttrain import _discovery as discovery
    from posttrain import _registry as registry

    known = {name: "posttrain" for name in BUILTIN_REPORTERS}
    for entry in discovery.discover(("plugin",)):
        if entry.usable:
            known.setdefault(entry.name, entry.package)
    manager = registry._manager  # plugins registered in this process (tests, notebooks)
    if manager is not None:
        for name, _plugin in manager.list_name_plugin():
            known.setdefault(str(name).split(":")[-1], str(name))
    return known


def report_to_problems(config: Any) -> list[str]:
    wanted = [str(name) for name in getattr(config, "report_to", None) or []]
    if not wanted:
        return []
    known = known_reporters()
    found = []
    for name in wanted:
        key = name.lower()
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
        if close:
            fix = f"did you mean {close[0]!r}?"
        elif key in KNOWN_REPORTERS:
            fix = f"it is provided by {KNOWN_REPORTERS[key]}: `pip install '{KNOWN_REPORTERS[key]}'`"
        else:
            fix = "install the plugin that provides it, or remove it (`posttrain list --kind plugin` shows plugins)"
        found.append(
            f"report_to names {name!r}, which no installed plugin recognises, so nothing would be logged there; {fix}"
        )
    if "none" in {n.lower() for n in wanted} and len(wanted) > 1:
        found.append(f"report_to lists 'none' together with other names ({wanted}); give 'none' alone or drop it")
    if {"tensorboard", "all"} & {n.lower() for n in wanted} and importlib.util.find_spec("tensorboard") is None:
        found.append("report_to includes 'tensorboard' but it is not installed; run `pip install tensorboard`")
    return found


def dataset_split_problems(config: Any) -> list[str]:
    split = getattr(config, "dataset_split", "train")
    dataset = getattr(config, "dataset", "")
    if split == "train" or not isinstance(dataset, str) or not dataset:
        return []
    path = Path(dataset).expanduser()
    if path.is_file():
        return [
            f"dataset_split is {split!r} but the dataset {dataset!r} is a single file, which has no splits, so the "
            "option would be ignored; point --dataset at the file of that split and drop --dataset_split"
        ]
    return []


def offline_mode() -> str | None:
    """The variable that puts the Hugging Face libraries offline, if one is set."""
    import os

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            return f"{variable}=1 is set"
    return None


def hub_unavailable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or no answer within ``timeout``), or None.

    Checked before a hub name is looked up, so a typo or a missing network fails in a second instead of after
    a minute of retries.
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    offline = offline_mode()
    if offline:
        return offline
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host} cannot be reached ({exc.strerror or exc})")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host} did not answer within {timeout:.0f} s"
