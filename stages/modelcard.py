"""The release README: a model card with hub metadata and the released point's evals."""

import yaml

TAGS = ("merge", "mergekit", "mergesweep", "linear-merge", "reasoning")
EVAL_COLUMNS = (
    ("accuracy", "accuracy"),
    ("mean_tokens", "mean tokens"),
    ("median_tokens", "median tokens"),
    ("p90_tokens", "p90 tokens"),
    ("format_rate", "formatted"),
    ("truncation_rate", "truncated"),
    ("n", "problems"),
)


def hub_id(source: str) -> str:
    """`hf://OWNER/NAME` -> `OWNER/NAME`; a local source stays its path."""
    return source.removeprefix("hf://")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def eval_table(row: dict) -> str:
    """Markdown table of one sweep point: overall, then each dataset when present."""
    cols = [(k, label) for k, label in EVAL_COLUMNS if k in row]
    lines = [
        "| set | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| all | " + " | ".join(_cell(row[k]) for k, _ in cols) + " |",
    ]
    for name, sub in sorted((row.get("datasets") or {}).items()):
        if isinstance(sub, dict):
            cells = " | ".join(_cell(sub.get(k)) for k, _ in cols)
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def render(
    name: str,
    *,
    sources: dict[str, str],
    weights: dict[str, float],
    dtype: str,
    mergekit_yaml: str,
    eval_row: dict | None = None,
) -> str:
    """The README.md text; `sources` maps constituent name (len, acc) to its source."""
    meta = {
        "base_model": [hub_id(sources[k]) for k in ("len", "acc")],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
    }
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    parts = [
        f"---\n{front}\n---",
        f"# {name}",
        "A linear merge of two fine-tunes of one reasoning model, made by mergesweep: "
        f"`len` ({hub_id(sources['len'])}) with weight {weights['len']:g} and `acc` "
        f"({hub_id(sources['acc'])}) with weight {weights['acc']:g}, accumulated in "
        f"float32 and stored as {dtype}. The tensors are bit-identical to what "
        "`mergekit-yaml` writes for the configuration below. Prompts open the "
        "reasoning with `<think>`; answers end in `\\boxed{}`.",
        "## Merge configuration",
        f"```yaml\n{mergekit_yaml.strip()}\n```",
    ]
    if eval_row:
        parts += [
            "## Evaluation",
            f"The sweep's point at weight {eval_row.get('weight', weights['len']):g}; "
            "token counts are of the generated response.",
            eval_table(eval_row),
        ]
    parts.append(
        "## Provenance\n\n`provenance.json` lists each constituent's source, resolved "
        "revision and file hashes, the package versions, the git commit and the sha256 "
        "of every file in this folder."
    )
    return "\n\n".join(parts) + "\n"
