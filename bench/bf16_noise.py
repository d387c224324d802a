"""How far apart two correct bf16 runs of a deep random-weight Gemma 4 are (CPU, a few minutes).

    python bench/bf16_noise.py

Random-weight models are chaotic: at full E2B depth (35 layers; vocab cut to 4096 to fit a CPU), HF's own bf16
eager and bf16 sdpa last-position logits differ by ~0.98 of their scale, and each differs from fp32 by ~0.8-0.9
(seen: 0.82 / 0.91 / 0.98). So ``max_rel_diff`` between two bf16 implementations in the model benchmark is not a
correctness check on deep random models; correctness is checked against fp32 references by the three-way rule
in the test suite (tests/test_patch.py, tests/test_bridge_integration.py).
"""
import dataclasses
import time

import torch

from gemma4_fast.models import build_model
from gemma4_fast.presets import get_preset


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    p = get_preset("E2B")
    p = dataclasses.replace(p, text=dict(p.text, vocab_size=4096, vocab_size_per_layer_input=4096))
    ids = torch.randint(4, 4096, (1, 96), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2

    def last(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, use_cache=False).logits[0, -1].float()

    t0 = time.time()
    m32 = build_model(p, torch.float32, "cpu", attn_implementation="eager")
    ref = last(m32)
    state = {k: v.to(torch.bfloat16) for k, v in m32.state_dict().items()}
    del m32
    res = {}
    for impl in ("eager", "sdpa"):
        m = build_model(p, torch.bfloat16, "cpu", attn_implementation=impl)
        m.load_state_dict(state, strict=False)
        res[impl] = last(m)
        del m
    print(f"bf16 eager vs fp32: {rel(res['eager'], ref):.3f}  bf16 sdpa vs fp32: {rel(res['sdpa'], ref):.3f}  "
          f"bf16 sdpa vs bf16 eager: {rel(res['sdpa'], res['eager']):.3f}  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
