"""Checks on a model source before anything heavy runs: local folders load from safetensors only,
and a name that is neither a folder nor reachable on the hub fails at once in one line."""

from __future__ import annotations

import os
from pathlib import Path

from steerscope.errors import ModelLoadError


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (False when HF_HUB_OFFLINE is set)."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)  # DNS lookups ignore the socket timeout, so the thread is abandoned if it hangs
    return bool(ok)


def check_source(source: str, aliases: list[str]) -> None:
    """Fail at once, in one line, for a model source that cannot load: a missing path, a folder that
    is not a model or holds only pickle weights, or a hub id with no hub and no local copy."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {source!r} has no config.json; it is not a model folder")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            what = f"only pickle weights ({', '.join(pickled[:3])})" if pickled else "no weights"
            raise ModelLoadError(f"folder {source!r} holds {what}; steerscope loads safetensors only (never "
                                 "unpickles): convert the checkpoint with save_pretrained(safe_serialization=True)")
        return
    if path.exists():
        raise ModelLoadError(f"model path {source!r} is a file; give an alias, a folder, a .gguf file or a hub id")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(
            f"model path {source!r} does not exist; give an alias ({', '.join(aliases)}), a folder, a .gguf file or a hub id"
        )
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError:  # not a valid repo id
        raise ModelLoadError(f"{source!r} is neither an alias ({', '.join(aliases)}), a folder, a .gguf file "
                             "nor a valid hub id") from None
    if not cached and not _hub_reachable():
        raise ModelLoadError(
            f"no folder named {source!r} exists, it is not an alias ({', '.join(aliases)}), and the Hugging Face hub "
            "is unreachable (offline?); give a local folder or a .gguf file"
        )
