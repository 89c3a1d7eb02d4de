"""Run launch/train.py's main in this process, then write which gloo threads are still alive."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import train  # noqa: E402  (launch/train.py)

out, argv = Path(sys.argv[1]), sys.argv[2:]
code = train.main(argv)
threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
out.with_suffix(f".{os.environ['RANK']}.json").write_text(json.dumps({"code": code, "threads": threads}))
