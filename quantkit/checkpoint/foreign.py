"""Name the quantized layouts quantkit does not read, in one sentence each.

quantkit reads two layouts: compressed-tensors (pack-quantized, int-quantized,
float-quantized) and AWQ GEMM (4-bit with zero points, as its own exporter and
AutoAWQ write it). Anything else gets one message that says what the folder
holds, instead of a KeyError from a tensor name the reader does not know.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.checkpoint.config import show

READS = ("quantkit reads compressed-tensors checkpoints (pack-quantized, int-quantized, float-quantized) "
         "and AWQ GEMM ones (4-bit with zero points)")
REQUANTIZE = "; quantize the float model with quantkit instead (quantkit quantize MODEL --recipe {recipe})"

# quant_method (lower case) -> what the folder is
METHODS = {
    "gptq": "a GPTQ checkpoint (qweight/qzeros/scales/g_idx)",
    "bitsandbytes": "a bitsandbytes checkpoint (NF4/FP4 or LLM.int8 weights with their quant_state)",
    "hqq": "an HQQ checkpoint (half-quadratic quantization)",
    "quanto": "an optimum-quanto checkpoint",
    "torchao": "a torchao checkpoint (tensor subclasses)",
    "fp8": "a Hugging Face fine-grained FP8 checkpoint (block-wise weight_scale_inv)",
    "fbgemm_fp8": "an FBGEMM FP8 checkpoint",
    "eetq": "an EETQ int8 checkpoint",
    "aqlm": "an AQLM checkpoint (additive codebooks)",
    "vptq": "a VPTQ checkpoint (vector-quantized codebooks)",
    "higgs": "a HIGGS checkpoint",
    "spqr": "a SpQR checkpoint",
    "bitnet": "a BitNet checkpoint (ternary weights)",
    "quark": "an AMD Quark checkpoint",
    "auto-round": "an AutoRound checkpoint",
    "autoround": "an AutoRound checkpoint",
    "exl2": "an ExLlamaV2 (EXL2) checkpoint",
    "exl3": "an ExLlamaV3 (EXL3) checkpoint",
    "marlin": "a Marlin checkpoint (GPTQ weights repacked for the Marlin kernel)",
    "gptq_marlin": "a Marlin checkpoint (GPTQ weights repacked for the Marlin kernel)",
    "awq_marlin": "a Marlin checkpoint (AWQ weights repacked for the Marlin kernel)",
    "gguf": "a GGUF checkpoint",
    "mxfp4": "an MXFP4 checkpoint",
    "fp_quant": "an FP-Quant checkpoint",
    "modelopt": "an NVIDIA ModelOpt checkpoint",
    "squeezellm": "a SqueezeLLM checkpoint",
}
RECIPES = {"gptq": "w4a16-gptq", "fp8": "w8a8-fp8-dynamic", "fbgemm_fp8": "w8a8-fp8-dynamic", "eetq": "w8a8-int8-dynamic"}


def refusal(folder: Path, what: str, recipe: str = "w4a16-rtn") -> str:
    return f"{folder} is {what}, which quantkit does not read; {READS}" + REQUANTIZE.format(recipe=recipe)


def foreign_method(folder: Path, qconfig: dict) -> str | None:
    """The refusal for a quantization_config quantkit does not read (None: it may be one it reads).
    AWQ of the GEMM version is left to quantkit.checkpoint.awq, which reads it."""
    method = qconfig.get("quant_method")
    if not isinstance(method, str):
        return None  # the parser names the missing or mistyped field
    key = method.strip().lower()
    if key == "compressed-tensors":
        return None
    if key == "awq":
        version = qconfig.get("version", "gemm")
        if isinstance(version, str) and version.lower() == "gemm":
            return None
        return refusal(folder, f"an AWQ checkpoint of version {show(version)} (quantkit reads version \"gemm\")", "w4a16-awq")
    if key in METHODS:
        return refusal(folder, METHODS[key], RECIPES.get(key, "w4a16-rtn"))
    return refusal(folder, f"a checkpoint with quant_method {show(method)}")


def unlabelled(folder: Path, quantized_tensor: str) -> str:
    """The refusal for a folder whose weights are quantized but whose config.json says nothing of it."""
    if (folder / "quantize_config.json").is_file() or quantized_tensor.endswith((".qweight", ".qzeros", ".g_idx")):
        return refusal(folder, METHODS["gptq"] if (folder / "quantize_config.json").is_file()
                       else "a GPTQ or AWQ checkpoint (qweight/qzeros/scales)", "w4a16-gptq")
    return (f"{folder}: config.json has no quantization_config, but its weights are quantized "
            f"({quantized_tensor}); {READS}, each with its quantization_config in config.json")
