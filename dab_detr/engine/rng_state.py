"""The random state of the training process, as a checkpointable (``state_dict`` /
``load_state_dict``): torch's CPU generator, every CUDA device's generator, numpy's and Python's
global generators. Saved by the main process; a resumed run restores it in every process (with
several processes, the other ranks' states are not those they had: on CPU training draws no random
numbers after the model is built unless the model uses dropout).

Stored as tensors, ints and strings only, so that ``torch.load(weights_only=True)`` reads it.
"""
import random
from typing import Dict

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    def state_dict(self) -> Dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            states = state["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
