"""Run a dry run (COMM_MODE=fake_backend) of the debug config through run_train.sh, as a user
would, and read its dry_run.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs" / "debug_model.toml")


def dry_run(tmp_path: Path, *args: str, ngpu: int = 8, rc: int = 0, **env) -> tuple[str, dict]:
    """(log, dry_run.json or {}) of a dry run of the debug model at `ngpu` ranks; asserts the
    exit status is `rc`. `env` adds environment variables."""
    env = {**os.environ, "TITAN_PYTHON": sys.executable, "CONFIG_FILE": DEBUG_TOML, **env}
    env |= {"COMM_MODE": "fake_backend", "NGPU": str(ngpu)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", "--training.device=cpu"]
    out = subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    log = out.stdout + out.stderr
    assert out.returncode == rc, log[-4000:]
    path = tmp_path / "dry_run.json"
    return log, json.loads(path.read_text()) if path.exists() else {}
