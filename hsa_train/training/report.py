"""How a run reports its numbers: the eval line on the console, the scalars for the tracker, the metrics.json
fields."""

from __future__ import annotations


def loss_summary(losses: list[float], window: int) -> dict[str, float]:
    tail = losses[-window:]
    return {
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_loss_final_avg": sum(tail) / len(tail),
    }


def eval_summary(result: dict | None) -> dict:
    """The held-out split's metrics under their metrics.json names (eval_loss, eval_exact_match, ...)."""
    keys = ("loss", "loss_per_type", "tokens_per_type", "exact_match", "answer_token_accuracy", "answers_by")
    return {f"eval_{key}": (result.get(key) if result else None) for key in keys}


def eval_line(name: str, result: dict) -> str:
    per_type = ", ".join(
        f"{k} {v:.4f} ({result['tokens_per_type'][k]} tok)" for k, v in result["loss_per_type"].items() if v is not None
    )
    line = f"{name}: loss {result['loss']:.4f} over {result['tokens']} tokens | per type: {per_type}"
    if result["exact_match"] is not None:
        line += (
            f" | final answer{' (generated)' if result.get('answers_by') == 'generation' else ''}: "
            f"exact match {result['exact_match']:.3f} of {result['answers']}, "
            f"token accuracy {result['answer_token_accuracy']:.3f}"
        )
    return line


def eval_log(prefix: str, result: dict) -> dict[str, float]:
    """The scalars of one evaluation for the tracker, under `prefix` (eval/, eval/len4x/, ...)."""
    logged = {f"{prefix}loss": result["loss"]}
    logged.update({f"{prefix}loss_{k}": v for k, v in result["loss_per_type"].items() if v is not None})
    for key in ("exact_match", "answer_token_accuracy"):
        if result[key] is not None:
            logged[f"{prefix}{key}"] = result[key]
    return logged


def preference_eval_summary(result: dict | None, labelled: bool = False) -> dict:
    """A preference run's held-out metrics under their metrics.json names. DPO (preference.summarize_preference):
    eval_loss, eval_pairs, eval_rewards.{chosen,rejected,accuracy,margin}, eval_logps.{chosen,rejected}; KTO
    (kto.KTOLoss.evaluate, `labelled`): eval_samples instead of eval_pairs, and eval_kl, eval_count too."""
    keys = ("loss", "samples", "rewards", "logps", "kl", "count") if labelled else ("loss", "pairs", "rewards", "logps")
    return {f"eval_{key}": (result.get(key) if result else None) for key in keys}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def preference_eval_line(name: str, result: dict) -> str:
    rewards, logps = result["rewards"], result["logps"]
    labelled = "samples" in result
    n = result["samples"] if labelled else result["pairs"]
    if not n:
        return f"{name}: no {'samples' if labelled else 'pairs'}"
    line = f"{name}: loss {result['loss']:.4f} over {n} {'labelled samples' if labelled else 'pairs'}"
    if labelled:
        line += f" ({result['count']['chosen']} desirable) | KL baseline {result['kl']:.4f}"
    return line + (
        f" | accuracy {rewards['accuracy']:.3f}, margin {_num(rewards['margin'], 4)} | rewards chosen "
        f"{_num(rewards['chosen'], 4)}, rejected {_num(rewards['rejected'], 4)} | logps chosen "
        f"{_num(logps['chosen'], 2)}, rejected {_num(logps['rejected'], 2)}"
    )


def preference_eval_log(prefix: str, result: dict) -> dict[str, float]:
    logged = {f"{prefix}loss": result["loss"]}
    if "kl" in result:
        logged[f"{prefix}kl"] = result["kl"]
    for group in ("rewards", "logps"):
        logged.update({f"{prefix}{group}/{k}": v for k, v in result[group].items() if v is not None})
    return logged
