from quantkit.eval.perplexity import PerplexityResult, perplexity, windows_of

__all__ = ["PerplexityResult", "perplexity", "windows_of"]
