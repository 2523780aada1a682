"""Which files of a model folder are safe to take: weights, configs, tokenizer."""

from fnmatch import fnmatch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFE_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "README.md",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_safe(relpath: str) -> bool:
    """True for files taken from a constituent; never code, never pickles."""
    return "/" not in relpath and any(fnmatch(relpath, p) for p in SAFE_PATTERNS)


def is_pickle(relpath: str) -> bool:
    return relpath.lower().endswith(PICKLE_SUFFIXES)


def check_weights(where: str, names: list[str]) -> None:
    """Refuse a file list without safetensors, naming pickles when that is all."""
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if is_pickle(n))
    if pickles:
        raise ValueError(
            f"{where} has only pickle weights ({', '.join(pickles[:3])}); mergesweep "
            "loads safetensors only, never pickles: convert the weights to safetensors "
            "in a trusted environment and point the source at that"
        )
    raise ValueError(f"{where} has no *.safetensors weights")
