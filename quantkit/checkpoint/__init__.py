from quantkit.checkpoint.config import build_quantization_config, spec_resolver
from quantkit.checkpoint.reader import checkpoint_summary, is_quantized_checkpoint, load_checkpoint
from quantkit.checkpoint.validate import validate_checkpoint
from quantkit.checkpoint.writer import REPORT_FILE, RECIPE_FILE, atomic_output, check_output, write_checkpoint

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "atomic_output",
    "build_quantization_config",
    "check_output",
    "checkpoint_summary",
    "is_quantized_checkpoint",
    "load_checkpoint",
    "spec_resolver",
    "validate_checkpoint",
    "write_checkpoint",
]
