from quantkit.nn.quant_linear import IntWeightLinear, W8A8Linear

__all__ = ["IntWeightLinear", "W8A8Linear"]
