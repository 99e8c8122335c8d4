"""The official ``kaggle`` CLI: where it finds credentials, the two calls we make, and running it.

Used by the download stage (``kaggle competitions download``) and the submit stage
(``kaggle competitions submit``). :func:`run` runs the CLI with stdin closed (it must never wait on
a prompt) and a timeout (a stalled network must not hang a stage), and blanks every credential
value out of the output it returns, so no error message or log line can leak the Kaggle key.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from products10k.common import DataError

# Environment variables whose values are credentials (KAGGLE_USERNAME is not a secret).
SECRET_VARS = ("KAGGLE_KEY", "KAGGLE_API_TOKEN")


class CredentialsNotFound(DataError):
    """No credentials anywhere the CLI looks (a broken ``kaggle.json`` is a plain DataError)."""


def download_command(competition: str, dest: str | os.PathLike, executable: str = "kaggle") -> list[str]:
    """The official CLI call that downloads the competition archive into ``dest``."""
    return [executable, "competitions", "download", "-c", competition, "-p", str(dest)]


def submit_command(
    competition: str, path: str | os.PathLike, message: str, executable: str = "kaggle"
) -> list[str]:
    """The official CLI call that uploads the submission file ``path`` to ``competition``."""
    return [executable, "competitions", "submit", "-c", competition, "-f", str(path), "-m", message]


def _config_dir(env: Mapping[str, str], home: str | os.PathLike | None) -> Path:
    """``KAGGLE_CONFIG_DIR``, else ``<home>/.kaggle``; ``home`` defaults to ``env``'s HOME."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    if home is None:
        home = env.get("HOME") or Path.home()
    return Path(home) / ".kaggle"


def kaggle_credentials(env: Mapping[str, str] | None = None, home: str | os.PathLike | None = None) -> str:
    """Say where the Kaggle CLI will find credentials; raise DataError when it will find none.

    Looks where the CLI looks: ``KAGGLE_USERNAME``+``KAGGLE_KEY`` or ``KAGGLE_API_TOKEN`` in the
    environment ``env`` (default ``os.environ``), else ``kaggle.json`` or ``access_token`` in
    ``KAGGLE_CONFIG_DIR`` (default ``<home>/.kaggle``, ``home`` defaulting to ``env``'s HOME).
    A ``kaggle.json`` without a username and key is a DataError; no credentials at all is a
    :class:`CredentialsNotFound`. Returns a description of the source, never a credential.
    """
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "environment variables KAGGLE_USERNAME/KAGGLE_KEY"
    if env.get("KAGGLE_API_TOKEN"):
        return "environment variable KAGGLE_API_TOKEN"
    config_dir = _config_dir(env, home)
    token = config_dir / "kaggle.json"
    if token.is_file():
        try:
            data = json.loads(token.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{token}: not readable JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not data.get("username") or not data.get("key"):
            raise DataError(f"{token}: expected keys 'username' and 'key'")
        return f"file {token}"
    if (config_dir / "access_token").is_file():
        return f"file {config_dir / 'access_token'}"
    raise CredentialsNotFound(
        "Kaggle credentials not found: set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json "
        f"(from kaggle.com > Settings > API) at {token}"
    )


def secrets(env: Mapping[str, str] | None = None, home: str | os.PathLike | None = None) -> list[str]:
    """Every credential value the CLI could be using: the environment's and the config files'."""
    env = os.environ if env is None else env
    found = [env.get(name, "") for name in SECRET_VARS]
    config_dir = _config_dir(env, home)
    try:
        data = json.loads((config_dir / "kaggle.json").read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("key"), str):
            found.append(data["key"])
    except (OSError, ValueError):
        pass  # absent or broken: kaggle_credentials reports it
    try:
        found.append((config_dir / "access_token").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        pass
    return [s for s in found if s]


def mask(text: str, values: list[str]) -> str:
    """``text`` with every non-empty string of ``values`` replaced by ``***``."""
    # Longest first: a secret that contains another is blanked whole.
    for value in sorted(values, key=len, reverse=True):
        if value:
            text = text.replace(value, "***")
    return text


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` non-blank lines of CLI output (of a progress bar: its last state)."""
    # Progress bars rewrite one line with carriage returns: keep the last state of each line.
    rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines()]
    return "\n".join(row for row in rows[-lines:] if row.strip())


@dataclass(frozen=True)
class CliRun:
    """What :func:`run` saw: the exit code (None when killed at the timeout) and the output."""

    returncode: int | None
    output: str  # stdout and stderr interleaved, every credential value blanked out

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run(
    cmd: list[str],
    timeout_s: float,
    *,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
) -> CliRun:
    """Run the CLI ``cmd`` with stdin closed and a timeout; never raises for its failure.

    ``env`` is the child's environment (default: ours). Its output goes to ``log_path`` as it
    comes (default: a temporary file), so a CLI that leaves a child holding the output open cannot
    hang us past the timeout; the log file itself is left as written. The returned output has the
    credential values of ``env`` and of the Kaggle config files replaced by ``***``.
    """
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()
    with log:
        try:
            returncode: int | None = subprocess.run(
                cmd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = None
        log.seek(0)
        data = log.read()
    # Universal newlines, as reading the output in text mode gives.
    output = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return CliRun(returncode, mask(output, secrets(env)))
