"""The nearest supported construct: hints for what a spec writer moving from PyTorch, FlexAttention
or FlashAttention tries first and the spec language spells otherwise.

Every refusal of the expression language (exprs.py) and of the graph builder (passes/build.py)
that names an unknown function, a method or module call, an undefined name or an unknown keyword
asks here for its hint; the table below is the one place that knows the PyTorch spellings.
"""
from __future__ import annotations

import difflib

# function or method names from torch / torch.nn.functional / math -> the spec language's spelling
SPELLINGS = {
    "clamp": "minimum(maximum(x, low), high)",
    "clip": "minimum(maximum(x, low), high)",
    "softplus": "log(1 + exp(x))",
    "silu": "x * sigmoid(x)",
    "swish": "x * sigmoid(x)",
    "pow": "x ** y",
    "exp2": "2 ** x",
    "log2": "log(x) / log(2)",
    "log10": "log(x) / log(10)",
    "max": "maximum(a, b) (elementwise; a row maximum is internal to softmax)",
    "min": "minimum(a, b) (elementwise)",
    "fmax": "maximum(a, b)",
    "fmin": "minimum(a, b)",
    "long": "to_int(x)",
    "masked_fill": "softmax(s, keep=[predicate]) to drop scores (True = kept), or where(predicate, x, other)",
    "masked_fill_": "softmax(s, keep=[predicate]) to drop scores (True = kept), or where(predicate, x, other)",
    "log_softmax": "softmax(s, keep=[...]): its row statistics are internal to the kernels",
    "logsumexp": "softmax(s, keep=[...]): its row statistics are internal to the kernels",
    "scaled_dot_product_attention": "s: dot(q, k) * scale; p: softmax(s, keep=[...]); o: dot(p, v)",
    "flex_attention": "s: dot(q, k) * scale (+ score modification); p: softmax(s, keep=[mask predicates]); o: dot(p, v)",
    "matmul": "dot(a, b): contracts the last dim of a with the same dim of b",
    "bmm": "dot(a, b): contracts the last dim of a with the same dim of b",
    "einsum": "dot(a, b): contracts the last dim of a with the same dim of b",
    "normalize": "l2norm(x) (along the feature dim)",
    "layer_norm": "rmsnorm(x) (along the feature dim)",
    "rms_norm": "rmsnorm(x)",
    "repeat_interleave": "nothing: k and v may have fewer heads than q (grouped KV heads), no repeat needed",
    "repeat": "nothing: dims broadcast by name, and k, v may have fewer heads than q",
    "expand": "nothing: dims broadcast by name",
    "tril": "a keep-predicate such as j <= i + J - I, given to softmax(s, keep=[...])",
    "triu": "a keep-predicate such as j >= i, given to softmax(s, keep=[...])",
    "where": "where(condition, a, b)",
}

# names PyTorch code uses for numbers the spec language writes differently
NAMES = {
    "inf": "scores are not set to -inf: drop them with softmax(s, keep=[predicate]) (True = kept)",
    "nan": "there is no NaN constant; drop entries with a keep-predicate",
    "pi": "write the number (3.141592653589793)",
    "e": "write the number (2.718281828459045) or exp(1)",
    "mask_mod": "a keep-predicate over b, h, i, j given to softmax(s, keep=[...])",
    "score_mod": "an expression of the scores and b, h, i, j before softmax",
}

# keywords that PyTorch's attention functions take -> what the spec language says instead
KEYWORDS = {
    "dim": "softmax is over the key dim j: leave it out (or write over=j)",
    "axis": "softmax is over the key dim j: leave it out (or write over=j)",
    "mask": "keep=[...] takes the predicates of the entries kept (True = keep)",
    "attn_mask": "keep=[...] takes the predicates of the entries kept (True = keep)",
    "is_causal": "keep=[j <= i + J - I] (bottom-right aligned causal)",
    "causal": "keep=[j <= i + J - I] (bottom-right aligned causal)",
    "scale": "multiply the scores before: softmax(s * scale)",
    "temperature": "divide the scores before: softmax(s / temperature)",
    "dtype": "backends compute softmax in float32 (float64 in the reference)",
    "enable_gqa": "nothing: k and v may have fewer heads than q",
}


def _close(name: str, options) -> str | None:
    close = difflib.get_close_matches(name, list(options), n=1)
    return close[0] if close else None


def unknown_op(name: str, known) -> str:
    """The hint for a call to a function the language lacks."""
    if name in SPELLINGS:
        return f"write {SPELLINGS[name]}"
    close = _close(name, known)
    return f"did you mean '{close}'?" if close else f"known ops: {', '.join(sorted(known))}"


def dotted_call(path: list[str], known) -> str:
    """The hint for `torch.softmax(x)`, `F.relu(x)`, `s.masked_fill(...)`, `math.log(2)`."""
    last = path[-1]
    if last in known:
        return f"call the op by its bare name: {last}(...)"
    if last in SPELLINGS:
        return f"write {SPELLINGS[last]}"
    return f"call an op by its bare name (known ops: {', '.join(sorted(known))})"


def undefined_name(name: str, known) -> str:
    if name in NAMES:
        return NAMES[name]
    close = _close(name, known)
    if close:
        return f"did you mean '{close}'?"
    return (f"declare it under params (a number: `{name}: 1.0`) or inputs (a tensor: `{name}: [h]`), "
            f"or use one of: {', '.join(sorted(known))}")


def unknown_keyword(op: str, keyword: str, keywords) -> str:
    if keyword in KEYWORDS and keyword not in keywords and op in ("softmax", "masked"):
        return KEYWORDS[keyword]
    close = _close(keyword, keywords)
    if close:
        return f"did you mean '{close}'?"
    return f"expected one of: {', '.join(sorted(keywords))}" if keywords else f"{op}() takes no keywords"
