from quantkit.nn.quant_linear import IntWeightLinear

__all__ = ["IntWeightLinear"]
