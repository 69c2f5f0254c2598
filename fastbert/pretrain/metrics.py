"""Where a run's figures go (rank 0 only): ``OUT/metrics.jsonl`` (one JSON object per row: logged
steps, evals, resume markers), TensorBoard when installed, and the progress bar."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out: Path, enabled: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.file = open(out / METRICS_FILE, "a") if enabled else None
        self.tb = None
        self.bar = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass
            if progress:
                try:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
                except ImportError:
                    pass

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
