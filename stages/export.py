"""python -m stages.export --adapter checkpoints/sft_lora --out export/model [--fingerprint fingerprints/model.json]

The fine-tuned model as one plain checkpoint a user can serve: the base loaded as training loaded
it (NF4 when model.load_in_4bit), dequantized to exactly the values the 4-bit matmuls multiply with,
the LoRA adapter merged into it, saved as safetensors in export.dtype with the adapter's tokenizer,
the base's generation_config and a provenance file (export.json). The directory loads with
`AutoModelForCausalLM.from_pretrained(out)` and carries no quantization_config.

The merge is done in float32, where rounding W + BA costs nothing measurable: the float32 export
computes the trained model to float32 precision (its logits are the unmerged model's within 1e-4 of the adapter's
effect). Against evaluate's logits it is 0.085 of the adapter's effect off on the tiny test model,
which is all evaluate's own bf16 arithmetic (the unmerged model in float32 is as far); a bfloat16
export, half the size, rounds each merged weight once and is 0.104 off. tests/test_export.py
measures and bounds these.

Not part of a plain `dvc repro` or `dvc exp run`: its stage lives in export/dvc.yaml, which DVC
reproduces only when asked (`dvc repro export/dvc.yaml`; README "Export").
"""
from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

from stages.config import ModelParams, load_params
from stages.io import UserError, atomic_path, check_writable, cli, is_write_error

PROVENANCE = "export.json"
# Written by every tokenizer's save_pretrained, fast or slow (whose other files differ).
TOKENIZER_FILE = "tokenizer_config.json"


def check_adapter(adapter: str, model_p: ModelParams) -> None:
    """An adapter directory trained on model.name, with the tokenizer training used saved beside it."""
    path = Path(adapter)
    config = path / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{adapter}: no LoRA adapter here (adapter_config.json missing); "
                        "run the train stage first (`dvc repro train`)")
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{adapter}: no tokenizer beside the adapter ({TOKENIZER_FILE} missing); "
                        "the train stage saves it there: re-run it (`dvc repro train`)")
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"{config}: not readable JSON ({exc})") from None
    # Merged onto another base of the same shape, the adapter would load without complaint and the
    # export would be a model nobody trained.
    if base is not None and base != model_p.name:
        raise UserError(f"{config}: base_model_name_or_path is '{base}' but params.yaml: model.name is "
                        f"'{model_p.name}'; export with the params the adapter was trained with")


def check_out(out: str, adapter: str) -> None:
    """The export directory is written whole at the end (minutes for an 8B model): check first that it
    can be, as atomic_path will write it, and that replacing it cannot delete the adapter."""
    check_writable(out, "--out", directory=True)
    # The old export is deleted when the new one is renamed into place: never with the adapter in it.
    here, source = Path(out).resolve(), Path(adapter).resolve()
    if here == source or source in here.parents or here in source.parents:
        raise UserError(f"--out {out}: overlaps the adapter directory {adapter}; choose another directory")


def merged_model(model_p: ModelParams, adapter: str, dtype: str):
    """The base as training loaded it, dequantized exactly, the adapter merged in float32, cast to `dtype`.

    Float32 holds every dequantized NF4 (or bf16) base weight and every bf16 adapter weight exactly,
    so W + BA is rounded once, to float32; a bfloat16 export is that sum rounded once more, to the
    nearest bf16 value (merging in bf16 would round BA and the sum separately).
    The model moves to the CPU first: float32 needs 4 bytes per parameter (32 GB for 8B), which a
    GPU that trained the NF4 model may not have, and save_pretrained copies to the CPU anyway.
    """
    import torch
    from peft import PeftModel

    from stages.modeling import compute_dtype, load_model

    model = load_model(model_p)
    if model_p.load_in_4bit:
        model = model.dequantize(dtype=compute_dtype(model_p))  # also drops config.quantization_config
    model = model.to("cpu").to(torch.float32)
    try:
        # peft's default upcasts the adapter to float32, exactly: the merge happens in float32.
        model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{adapter}: cannot load the LoRA adapter onto {model_p.name} "
                        f"({str(exc).splitlines()[0]}); run the train stage first (`dvc repro train`)") from None
    try:
        # safe_merge checks every merged weight for NaN/inf before it replaces the original.
        model = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise UserError(f"{adapter}: merging gives non-finite weights ({str(exc).splitlines()[0]}); "
                        "the adapter is broken: re-run the train stage") from None
    model = model.to(getattr(torch, dtype))
    model.eval()
    return model


def provenance(model_p: ModelParams, adapter: str, dtype: str, fingerprint: dict | None) -> dict:
    """What the export was made from, so that a served checkpoint can be traced to its run."""
    from importlib.metadata import version

    from stages.fingerprint import directory_sha256

    adapter_sha256, files = directory_sha256(Path(adapter), {})
    return {
        "base_model": model_p.name,
        "base_revision": model_p.revision,
        # The resolved hub commit or local directory hash (fingerprints/model.json), when given.
        "base_fingerprint": fingerprint,
        "base_loading": {"load_in_4bit": model_p.load_in_4bit, "bnb_4bit_quant_type": model_p.bnb_4bit_quant_type,
                         "bnb_4bit_use_double_quant": model_p.bnb_4bit_use_double_quant,
                         # a base loaded unquantized was never dequantized
                         "dequantized_to": model_p.bnb_4bit_compute_dtype if model_p.load_in_4bit else None},
        "adapter": adapter,
        "adapter_sha256": adapter_sha256,
        "adapter_files": files,
        "merged_in": "float32",
        "dtype": dtype,
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def save_failed_message(out: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return f"export: cannot write {out} ({first}); the disk {'is' if full else 'may be'} full: free space there and run again"


def read_fingerprint(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--fingerprint {path}: file not found (run `dvc repro fingerprint`)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--fingerprint {path}: not readable JSON ({exc})") from None


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="merge the LoRA adapter into its base, for serving")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory (with its tokenizer)")
    parser.add_argument("--out", required=True, help="directory to write the merged model to (replaced)")
    parser.add_argument("--fingerprint", default=None, help="fingerprints/model.json, recorded in export.json")
    args = parser.parse_args(argv)

    model_p, export_p = load_params(args.params, "model", "export")
    check_adapter(args.adapter, model_p)
    check_out(args.out, args.adapter)
    fingerprint = read_fingerprint(args.fingerprint)

    from transformers import AutoTokenizer

    model = merged_model(model_p, args.adapter, export_p.dtype)
    # The adapter directory holds the tokenizer training used (pad token and chat template included).
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    record = provenance(model_p, args.adapter, export_p.dtype, fingerprint)
    try:
        with atomic_path(args.out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except Exception as exc:
        if not is_write_error(exc):
            raise
        raise UserError(save_failed_message(args.out, exc)) from None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"export: {model_p.name} + {args.adapter} merged, {n_params / 1e6:.1f}M parameters in "
          f"{export_p.dtype}, written to {args.out}")


if __name__ == "__main__":
    main()
