"""How the tests run prunenet: ``compress`` in this process without a progress bar, the CLI in a subprocess."""

from __future__ import annotations

import subprocess
import sys

from prunenet.pipeline import compress


def compress_quietly(model, out, **kwargs):
    """``compress`` of the model folder ``model`` into ``out`` with no progress bar; returns its result.

    A test module binds its own defaults with ``functools.partial(compress_quietly, ratio=..., ...)``:
    keywords given at the call replace them."""
    return compress(model=str(model), out=out, progress=False, **kwargs)


def cli_command(*args, launcher=()) -> list:
    """The argv of ``python [launcher] -m prunenet *args``; ``launcher`` is e.g. ``-m torch.distributed.run ...``."""
    return [sys.executable, *launcher, "-m", "prunenet", *args]


def run_cli(*args, check: bool = True, launcher=(), **kwargs) -> subprocess.CompletedProcess:
    """Run :func:`cli_command` to its end with stdout and stderr captured as text; ``kwargs`` go to
    ``subprocess.run`` (``cwd``, ``env``, ``timeout``). With ``check`` a non-zero exit status fails the
    test, showing stderr; a test of a refusal passes ``check=False`` and reads ``returncode`` itself."""
    proc = subprocess.run(cli_command(*args, launcher=launcher), capture_output=True, text=True, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def compress_policy_quietly(model, out, *, episodes: int, **kwargs):
    """:func:`compress_quietly` with the paper's policy as the method unless ``method=`` names another, trained
    for ``episodes`` episodes (an option of that method only: another method runs without it)."""
    method = kwargs.setdefault("method", "prunenet")
    return compress_quietly(model, out, **kwargs, **({"episodes": episodes} if method == "prunenet" else {}))
