"""GPU smoke check: pruned generate() on CUDA (Triton kernels in the path) equals the same on CPU, for every
registered family (``vtprune.testing.TINY_FAMILIES``) x every registered method.

PYTHONPATH=. python scripts/gpu_check.py [--json report.json] [--max-new-tokens 6]

Method settings come from the contract matrix (``tests/contract/test_matrix.py``: ``METHOD_CASES``, which
must name every registered method), so a new method is checked here as soon as it is in the matrix; without
the tests folder a built-in list of the first methods is used. A family x method pair the method refuses
(``UsageError`` / ``UnsupportedError``) is reported as refused, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vtprune  # noqa: E402
from vtprune.errors import UnsupportedError, UsageError  # noqa: E402
from vtprune.kernels import gather as gather_mod  # noqa: E402
from vtprune.testing import TINY_FAMILIES  # noqa: E402

TEXT_LAYERS = 4
FALLBACK = {
    "fastervlm": lambda m, p: {"method": "fastervlm", "keep_ratio": 0.25},
    "random": lambda m, p: {"method": "random", "keep_ratio": 0.5},
    "fastv": lambda m, p: {"method": "fastv", "layer": 2, "keep_ratio": 0.3},
    "static_exit": lambda m, p: {"method": "static_exit", "layer": 2},
}


def method_cases() -> tuple[dict, str]:
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from contract.test_matrix import METHOD_CASES
        from contract.test_matrix import TEXT_LAYERS as matrix_layers

        assert matrix_layers == TEXT_LAYERS, "the matrix's settings are meant for its layer count"
        return {name: case[0] for name, case in METHOD_CASES.items()}, "tests/contract/test_matrix.py"
    except Exception as e:  # noqa: BLE001 - any reason to fall back is reported
        return dict(FALLBACK), f"built-in list ({type(e).__name__}: {e})"


def run(model, inputs, setting, device, new_tokens):
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    vtprune.wrap(model, dict(setting))
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        vtprune.unwrap(model)
    return out.sequences.cpu(), torch.stack(out.logits).float().cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="write the per-pair results here")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |logit diff| CUDA vs CPU")
    parser.add_argument("--dry-run", action="store_true", help="CPU vs CPU: check the script without a GPU")
    args = parser.parse_args(argv)
    second = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is required")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    calls = {"triton": 0}
    original = gather_mod._resolve_backend

    def counting(backend, tensors):
        chosen = original(backend, tensors)
        calls["triton"] += chosen == "triton"
        return chosen

    gather_mod._resolve_backend = counting
    cases, source = method_cases()
    print(f"methods from {source}: {', '.join(sorted(cases))}")
    missing = sorted(set(vtprune.available_methods()) - set(cases))
    rows, failures = [], 0
    tmp = Path(tempfile.mkdtemp())
    for name, family in TINY_FAMILIES.items():
        for method, make in sorted(cases.items()):
            start = time.perf_counter()
            row = {"family": name, "method": method}
            try:
                model = family.build(text_layers=TEXT_LAYERS)
                inputs = family.inputs(model)
                setting = make(model, tmp / f"{name}-{method}")
                row["setting"] = setting
                cpu_seq, cpu_logits = run(model, inputs, setting, "cpu", args.max_new_tokens)
                gpu_seq, gpu_logits = run(model, inputs, setting, second, args.max_new_tokens)
                row["tokens_equal"] = bool(torch.equal(cpu_seq, gpu_seq))
                row["max_logit_diff"] = float((cpu_logits - gpu_logits).abs().max())
                row["ok"] = row["tokens_equal"] and row["max_logit_diff"] <= args.tolerance
            except (UsageError, UnsupportedError) as e:
                row.update(ok=True, refused=str(e).splitlines()[0][:200])
            except Exception as e:  # noqa: BLE001 - reported per pair, the check goes on
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            row["seconds"] = round(time.perf_counter() - start, 2)
            failures += not row["ok"]
            rows.append(row)
            detail = (
                row.get("refused")
                or row.get("error")
                or (f"tokens equal: {row['tokens_equal']}  max |logit diff|: {row['max_logit_diff']:.2e}")
            )
            print(f"{name:16s} {method:12s} {'ok ' if row['ok'] else 'FAIL'} {detail}", flush=True)
    print(f"Triton gathers used on CUDA: {calls['triton']} calls")
    if missing:
        print(f"methods not checked (not in the matrix): {missing}")
    print("FAILED" if failures else "all equal")
    if args.json:
        report = {
            "device": torch.cuda.get_device_name() if second == "cuda" else "cpu (dry run)",
            "method_source": source,
            "methods_missing": missing,
            "triton_gather_calls": calls["triton"],
            "pairs": rows,
            "failures": failures,
            "ok": failures == 0 and not missing,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
