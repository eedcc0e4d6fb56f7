"""GPU smoke check: pruned generate() on CUDA (Triton gathers in the path) equals the same on CPU.

PYTHONPATH=. python scripts/gpu_check.py
"""

import torch

import vtprune
from vtprune.kernels import gather as gather_mod
from vtprune.testing import TINY_FAMILIES

SETTINGS = [
    {"method": "fastervlm", "keep_ratio": 0.25},
    {"method": "random", "keep_ratio": 0.5},
    {"method": "fastv", "layer": 2, "keep_ratio": 0.3},
    {"method": "static_exit", "layer": 2},
]


def run(model, inputs, setting, device):
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    vtprune.wrap(model, dict(setting))
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        vtprune.unwrap(model)
    return out.sequences.cpu(), torch.stack(out.logits).float().cpu()


def main():
    assert torch.cuda.is_available(), "CUDA is required"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    calls = {"triton": 0}
    original = gather_mod._resolve_backend

    def counting(backend, tensors):
        chosen = original(backend, tensors)
        calls["triton"] += chosen == "triton"
        return chosen

    gather_mod._resolve_backend = counting
    failures = 0
    for name, family in TINY_FAMILIES.items():
        for setting in SETTINGS:
            model = family.build(text_layers=4)
            inputs = family.inputs(model)
            cpu_seq, cpu_logits = run(model, inputs, setting, "cpu")
            gpu_seq, gpu_logits = run(model, inputs, setting, "cuda")
            same = torch.equal(cpu_seq, gpu_seq)
            diff = (cpu_logits - gpu_logits).abs().max().item()
            failures += not same or diff > 1e-3
            print(f"{name:9s} {str(setting):55s} tokens equal: {same}  max |logit diff|: {diff:.2e}")
    print(f"Triton gathers used on CUDA: {calls['triton']} calls")
    print("FAILED" if failures else "all equal")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
